"""Iteration-level batching: one engine per served model decodes the requests of all clients together.

Requests enter a bounded queue: beyond ``max_queue_requests`` requests or ``max_queue_tokens`` source tokens a
request is refused at once (RESOURCE_EXHAUSTED, naming the limit) rather than queueing without end. At every step
boundary the engine admits waiting requests under its budget (``max_batch_rows`` hypotheses, ``max_batch_tokens``
source positions over them): the oldest first, so nothing starves, then those whose source length is closest to it,
so the group pads little (a request of more than half the budget's hypotheses is decoded in parts, one after the
other, so that calls arriving meanwhile fit beside it). The encoder runs once for the admitted group and its rows
join the batch; every decoder step then runs on all active hypotheses of all admitted requests in one ONNX Runtime
call, and a sentence that finishes leaves the batch at once. Deadlines (a heap) and cancellations (the futures'
callbacks) are checked while queued and before every step.

The batch lives in preallocated slots (:mod:`server.engine.lanes`): a joining row is written into free room, a
leaving row's place is taken by the last row, so the static inputs (encoder memory, projected keys, mask) are
copied once at admission and then only for the rows that move. The exported step takes its static inputs per row, so
a beam's rows hold copies of one encoding: reordering a beam through its back-pointers moves only the recurrent
state. The search is numpy over arrays of all sentences of one setting (:class:`~server.search.Beams`), and reads
only each row's best candidates, reduced where the step ran (:mod:`server.reductions`); per-sentence Python runs
where a sentence starts or ends, not at every step.

The engine is a thread of its own: ONNX Runtime releases the GIL, so the event loop keeps accepting and answering
calls while the device computes, and hypotheses become responses on other threads.

Rows at different steps can share a call only when the decoder state has a fixed size (RNN state). A Transformer's
key/value cache grows with the step and the exported step has no mask over cache positions, so for such models
every admitted group is a *lane* of its own: all lanes step in turn, each in one call, and no group joins a running
lane (finished sentences still leave it at once). An RNN model's lanes are by source length (``LENGTH_BUCKETS``),
except under light load (``Limits.mixed_lane_rows``), when every source up to the last bound joins one lane.
"""

from server.engine.core import ADMISSION_WINDOW, LENGTH_BUCKETS, SEARCHES_KEPT, Engine, Limits, Request

__all__ = ["ADMISSION_WINDOW", "LENGTH_BUCKETS", "SEARCHES_KEPT", "Engine", "Limits", "Request"]
