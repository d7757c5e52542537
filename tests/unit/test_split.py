from tests.conftest import DING_SAMPLE
from training.data.corpus import Pair, normalise, split, split_of
from training.data.ding import read_ding


def test_split_is_deterministic_and_keyed_on_the_normalised_source() -> None:
    pairs = read_ding(DING_SAMPLE)
    first, second = split(pairs), split(pairs)
    assert first == second
    owner: dict[str, str] = {}
    for name, members in first.items():
        for pair in members:
            key = normalise(pair.source)
            assert owner.setdefault(key, name) == name, f"{pair.source!r} is in {owner[key]} and {name}"
    assert all(first[name] for name in ("train", "valid", "test"))


def test_spelling_variants_of_one_source_share_a_split() -> None:
    a = Pair("Guten  Morgen.", "Good morning.", True)
    b = Pair("guten morgen.", "Morning!", True)
    assert split_of(a) == split_of(b)


def test_sentences_get_a_larger_held_out_share() -> None:
    pairs = [Pair(f"Das ist Satz Nummer {i}.", f"This is sentence {i}.", True) for i in range(5000)]
    held_out = sum(split_of(p) != "train" for p in pairs) / len(pairs)
    phrases = [Pair(f"Wort{i}", f"word{i}") for i in range(5000)]
    held_out_phrases = sum(split_of(p) != "train" for p in phrases) / len(phrases)
    assert 0.09 < held_out < 0.15
    assert 0.02 < held_out_phrases < 0.045
