import struct

import pytest

from training.data.gettext_catalogs import (
    CatalogStats,
    Message,
    catalog_pairs,
    message_pairs,
    read_mo,
    strip_accelerators,
)

HEADER = "Content-Type: text/plain; charset={charset}\nPlural-Forms: nplurals=2; plural=(n != 1);\n"


def mo_bytes(entries: dict[str, str], charset: str = "UTF-8", order: str = "<") -> bytes:
    """A .mo file as msgfmt writes it (no hash table): header, two tables of (length, offset), NUL-ended strings.
    Keys may hold a context (``ctx\\x04msgid``) or a plural (``singular\\x00plural``), values plural forms."""
    entries = {"": HEADER.format(charset=charset), **entries}
    keys = sorted(entries, key=lambda k: k.encode(charset))
    ids = [k.encode(charset) for k in keys]
    strs = [entries[k].encode(charset) for k in keys]
    n = len(keys)
    ids_at, strs_at = 28, 28 + 8 * n
    offset = 28 + 16 * n
    id_table, str_table, blob = [], [], b""
    for table, values in ((id_table, ids), (str_table, strs)):
        for value in values:
            table.append((len(value), offset + len(blob)))
            blob += value + b"\0"
    head = struct.pack(order + "7I", 0x950412DE, 0, n, ids_at, strs_at, 0, 0)
    tables = b"".join(struct.pack(order + "2I", *t) for t in id_table + str_table)
    return head + tables + blob


def pairs_of(entries: dict[str, str], **kwargs) -> list[tuple[str, str]]:
    return [(p.source, p.target) for p in catalog_pairs(mo_bytes(entries, **kwargs), "pkg")]


def test_source_is_the_german_msgstr_and_target_the_english_msgid() -> None:
    pairs = list(catalog_pairs(mo_bytes({"Open file": "Datei öffnen"}), "gedit"))
    assert len(pairs) == 1
    p = pairs[0]
    assert (p.source, p.target, p.domain, p.group) == ("Datei öffnen", "Open file", "gettext", "gedit")


def test_header_context_and_plurals() -> None:
    data = mo_bytes({
        "menu\x04Quit": "Beenden",
        "%d file\x00%d files": "%d Datei\x00%d Dateien",
        "Untranslated": "",
        "Same": "Same",
    })
    messages = read_mo(data)
    assert Message("Quit", "Beenden", "menu") in messages
    assert Message("%d file", "%d Datei", None, True) in messages
    assert all(m.msgid for m in messages)  # the header entry is not a message
    assert pairs_of({"menu\x04Quit": "Beenden", "%d file\x00%d files": "%d Datei\x00%d Dateien",
                     "Untranslated": "", "Same": "Same"}) == [("%d Datei", "%d file"), ("Beenden", "Quit")]


def test_charset_and_byte_order() -> None:
    assert pairs_of({"Open": "Öffnen"}, charset="ISO-8859-1") == [("Öffnen", "Open")]
    assert pairs_of({"Open": "Öffnen"}, order=">") == [("Öffnen", "Open")]


def test_a_broken_file_is_counted_not_raised() -> None:
    stats = CatalogStats()
    assert list(catalog_pairs(b"not a catalog at all", "pkg", stats)) == []
    assert stats.unreadable == 1
    with pytest.raises(ValueError):
        read_mo(mo_bytes({"a": "b"})[:40])


@pytest.mark.parametrize(
    ("msgstr", "msgid", "expected"),
    [
        ("_Datei", "_File", ("Datei", "File")),
        ("Ö_ffnen", "_Open", ("Öffnen", "Open")),
        ("&Speichern unter …", "Save &As…", ("Speichern unter …", "Save As…")),
        ("Ö&ffnen", "&Open", ("Öffnen", "Open")),
        ("Sicherheit && Datenschutz", "Security && Privacy", ("Sicherheit && Datenschutz", "Security && Privacy")),
        ("Suchen &amp; Ersetzen", "Search &amp; Replace", ("Suchen &amp; Ersetzen", "Search &amp; Replace")),
        ("Ungültiger Wert für max_size", "Invalid value for max_size",
         ("Ungültiger Wert für max_size", "Invalid value for max_size")),
        ("Datei %s_backup fehlt", "File %s_backup is missing", ("Datei %s_backup fehlt", "File %s_backup is missing")),
        ("{name}_alt existiert", "{name}_old exists", ("{name}_alt existiert", "{name}_old exists")),
        ("AT&T-Modem _wählen", "_Dial AT&T modem", ("AT&T-Modem wählen", "Dial AT&T modem")),
        ("Setzen Sie use_tls oder max_conn", "Set use_tls or max_conn",
         ("Setzen Sie use_tls oder max_conn", "Set use_tls or max_conn")),
        ("/_Ansicht/_Symbolleiste", "/_View/_Toolbar", ("/Ansicht/Symbolleiste", "/View/Toolbar")),
        ("<b>_Name:</b>", "<b>_Name:</b>", ("<b>Name:</b>", "<b>Name:</b>")),
    ],
)
def test_accelerators_are_stripped_names_and_entities_kept(msgstr: str, msgid: str, expected: tuple) -> None:
    assert strip_accelerators(msgstr, msgid) == expected


def test_placeholders_survive_untouched() -> None:
    entries = {
        "Cannot open %s: %d": "Kann %s nicht öffnen: %d",
        "%1$s of %2$s": "%1$s von %2$s",
        "Hello {name}": "Hallo {name}",
        "Clone <repo> now": "<repo> jetzt klonen",
        "Show _hidden files in %s": "_Verborgene Dateien in %s anzeigen",
    }
    assert sorted(pairs_of(entries)) == sorted([
        ("Kann %s nicht öffnen: %d", "Cannot open %s: %d"),
        ("%1$s von %2$s", "%1$s of %2$s"),
        ("Hallo {name}", "Hello {name}"),
        ("<repo> jetzt klonen", "Clone <repo> now"),
        ("Verborgene Dateien in %s anzeigen", "Show hidden files in %s"),
    ])


def test_untranslated_credits_and_letterless_entries_are_dropped() -> None:
    stats = CatalogStats()
    assert message_pairs(Message("_OK", "_Ok"), stats) == []  # the same once the markers are gone
    assert message_pairs(Message("translator-credits", "Erika Mustermann"), stats) == []
    assert message_pairs(Message("Your names", "Erika", "NAME OF TRANSLATORS"), stats) == []
    assert message_pairs(Message("%s: %s", "%s : %s"), stats) == []
    assert message_pairs(Message("Open", ""), stats) == []
    assert stats.dropped == {"untranslated": 2, "credits": 2, "no letter": 1}


def test_help_text_pairs_by_option_and_rewrapped_prose_stays_whole() -> None:
    msgid = ("  -a, --all     do not ignore entries\n"
             "                starting with .\n"
             "  -l            use a long listing format\n")
    msgstr = ("  -a, --all     Einträge, die mit . beginnen,\n"
              "                nicht verstecken\n"
              "  -l            ein langes Format verwenden\n")
    assert message_pairs(Message(msgid, msgstr)) == [
        ("-a, --all Einträge, die mit . beginnen, nicht verstecken", "-a, --all do not ignore entries starting with ."),
        ("-l ein langes Format verwenden", "-l use a long listing format"),
    ]
    # Two lines each, but wrapped differently: one pair, not two misaligned ones.
    prose = Message("Set the environment variable\nSIMPLE_BACKUP_SUFFIX.",
                    "Setzen Sie die\nUmgebungsvariable SIMPLE_BACKUP_SUFFIX.")
    assert message_pairs(prose) == [
        ("Setzen Sie die Umgebungsvariable SIMPLE_BACKUP_SUFFIX.", "Set the environment variable SIMPLE_BACKUP_SUFFIX.")
    ]


def test_overlong_messages_are_split_into_sentences_when_they_align() -> None:
    long_en = " ".join(["This is a fairly long sentence about files."] * 8)
    long_de = " ".join(["Das ist ein recht langer Satz über Dateien."] * 8)
    pairs = message_pairs(Message(long_en, long_de))
    assert len(pairs) == 8
    assert pairs[0] == ("Das ist ein recht langer Satz über Dateien.", "This is a fairly long sentence about files.")
    stats = CatalogStats()
    assert message_pairs(Message(long_en, long_de.replace(". ", ", ")), stats) == []
    assert stats.dropped == {"too long": 1}
