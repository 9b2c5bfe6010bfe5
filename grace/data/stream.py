"""The sample stream: which record each global position draws (:class:`SampleOrder`), bad draws replaced
deterministically, micro-batches encoded by DataLoader workers and resumable from a position
(:class:`SampleStream`, :func:`build_loader`).
"""

from __future__ import annotations

import collections
import os

import numpy as np
import torch

from grace.data.encode import ConversationDataset, SkipSample, collate
from grace.data.index import RecordIndex
from grace.errors import GraceError

MAX_DRAWS = 64          # draws per stream position before the data is declared unusable
GROUP_CHUNK = 64        # micro-batches per length-sorted chunk when grouping by length
PROBE_RECORDS = 16      # records of each kind (with an image, text only) encoded before training starts
# What to do about a skip reason that makes every record of a kind unusable (the data is what to check otherwise).
_HINTS = {
    "missing or unreadable image": lambda ds: f"images are looked up under {os.path.abspath(ds.image_folder)!r}: "
                                              "check --image-folder",
    "longer than max_length": lambda ds: f"--max-length {ds.max_length} is too short for them: raise it",
    "image without exactly one <image> token": lambda ds: "a record naming an image needs exactly one <image> tag "
                                                          "in its turns",
    "<image> token without an image": lambda ds: "a record with an <image> tag needs an \"image\" field",
}


def describe_unusable(what: str, reasons: collections.Counter, dataset: ConversationDataset) -> str:
    """One line: ``what``, the skip reasons with their counts, and what to do about each."""
    counts = ", ".join(f"{reason}: {n}" for reason, n in reasons.most_common())
    hints = [_HINTS[r](dataset) for r in reasons if r in _HINTS] or ["check the data"]
    return f"{what} ({counts}); {'; '.join(hints)}"


def check_usable(dataset: ConversationDataset, source: str = "the data", probe: int = PROBE_RECORDS) -> None:
    """Encode the first ``probe`` records with an image and the first ``probe`` text-only records (file order)
    and refuse the data when none of a kind encodes: a wrong image folder, image records without their
    ``<image>`` tag, or a max_length that no image sample fits would otherwise train on text alone (or, with
    no usable record at all, stop inside the draw loop). Raises GraceError naming ``source``, the reasons and
    their counts, and what to check."""
    has_image = np.asarray(dataset.index.has_image, bool)
    for kind, ids in (("image records", np.flatnonzero(has_image)[:probe]),
                      ("text-only records", np.flatnonzero(~has_image)[:probe])):
        reasons = collections.Counter()
        for i in ids:
            try:
                dataset[int(i)]
                break
            except SkipSample as s:
                reasons[s.reason] += 1
        else:
            if len(ids):
                raise GraceError(describe_unusable(f"{source}: none of the first {len(ids)} {kind} is usable",
                                                   reasons, dataset))


class SampleOrder:
    """Which record the stream draws at global position q: q counts the samples drawn by all ranks
    together since the run began, epoch q // n takes record ``epoch_order(q // n)[q % n]``.

    An epoch's order is a permutation seeded by (seed, epoch). With ``group_by_length`` each run of
    GROUP_CHUNK micro-batches of that permutation is sorted by (has image, record length) and cut into
    micro-batches of ``micro_batch`` samples whose order is shuffled again, so a micro-batch holds
    samples of one modality and similar length (less padding) while the epoch still visits every
    record once. Depends on seed, the index and micro_batch only: not on ranks or workers."""

    def __init__(self, index: RecordIndex, seed: int, micro_batch: int, group_by_length: bool = False):
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        self.n, self.seed, self.micro_batch = len(index), seed % (1 << 63), micro_batch
        self.group_by_length = group_by_length
        self._keys = (index.has_image, index.lengths()) if group_by_length else None
        self._cached: tuple[int, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.n)
        if self.group_by_length:
            has_image, lengths = self._keys
            size = GROUP_CHUNK * self.micro_batch
            for lo in range(0, self.n, size):
                chunk = order[lo:lo + size]
                chunk = chunk[np.lexsort((lengths[chunk], has_image[chunk]))]
                batches = [chunk[i:i + self.micro_batch] for i in range(0, len(chunk), self.micro_batch)]
                order[lo:lo + size] = np.concatenate([batches[j] for j in rng.permutation(len(batches))])
        self._cached = (epoch, order)
        return order

    def __call__(self, q: int) -> int:
        return int(self.epoch_order(q // self.n)[q % self.n])


UNUSABLE = "unusable_at"   # the key of the placeholder sample at a position whose draws were all bad


class _Draws(torch.utils.data.Dataset):
    """Worker side of the stream: item (q, record) -> (sample, [(record, reason) of the bad draws]). A bad
    record is replaced by draws seeded by (seed, q, attempt) only, so the sample at q is the same whichever
    worker or rank encodes it. After MAX_DRAWS bad draws the sample is {UNUSABLE: (q, their reasons)}: the stream
    raises in the training process, where the error is one line (an exception raised in a worker arrives
    re-raised by the DataLoader with the worker's traceback in its message)."""

    def __init__(self, dataset: ConversationDataset, seed: int):
        self.dataset, self.seed = dataset, seed % (1 << 63)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        q, rec = item
        bad = []
        for attempt in range(MAX_DRAWS):
            if attempt:
                rec = int(np.random.default_rng([self.seed, q, attempt]).integers(len(self.dataset)))
            try:
                return self.dataset[rec], bad
            except SkipSample as s:
                bad.append((rec, s.reason))
        return {UNUSABLE: (q, [reason for _, reason in bad])}, bad


class _RankBatches:
    """Batch sampler of one rank: micro-batch m covers stream positions [start + m*B, start + (m+1)*B),
    B = batch_size * world, of which rank r takes [r*batch_size, (r+1)*batch_size). Endless."""

    def __init__(self, order: SampleOrder, start: int, batch_size: int, rank: int, world: int):
        self.order, self.start, self.batch_size, self.rank, self.world = order, start, batch_size, rank, world

    def __iter__(self):
        step = self.batch_size * self.world
        base = self.start + self.rank * self.batch_size
        while True:
            yield [(q, self.order(q)) for q in range(base, base + self.batch_size)]
            base += step


class SampleStream:
    """This rank's endless stream of micro-batches (dicts of CPU tensors, see :func:`collate`), encoded by
    ``num_workers`` DataLoader worker processes (0: in this process).

    The samples, their order and the bad draws met depend only on (seed, micro-batch size * world,
    group_by_length, the data) and the start position: not on num_workers or how they are scheduled.
    MAX_DRAWS bad draws in a row raise GraceError from ``next`` (the reasons counted, what to check).
    ``state_dict()`` -> {"position": samples consumed by all ranks, "bad": {record: reason}} after the
    micro-batches taken so far (prefetched ones are not counted); a stream built with that state continues
    with exactly the micro-batch that would have come next. ``skipped``: the distinct bad records this rank
    has met (and, after a resume, those the checkpointing rank had met), by reason.
    """

    def __init__(self, dataset: ConversationDataset, *, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 num_workers: int = 0, group_by_length: bool = False, state: dict | None = None):
        for name, value, low in (("batch_size", batch_size, 1), ("world", world, 1), ("num_workers", num_workers, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not 0 <= rank < world:
            raise ValueError(f"rank must lie in [0, {world}), got {rank}")
        if len(dataset) == 0:
            raise ValueError("the dataset has no usable record")
        state = state or {"position": 0, "bad": {}}
        if not isinstance(state.get("position"), int) or state["position"] < 0:
            raise ValueError(f"state['position'] must be an int >= 0, got {state.get('position')!r}")
        self.dataset, self.position, self.bad = dataset, state["position"], dict(state.get("bad", {}))
        self._step = batch_size * world
        order = SampleOrder(dataset.index, seed, self._step, group_by_length)
        if num_workers > 0:   # tokenizers' own threads would be disabled, with a warning, in forked workers
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        pad_id = dataset.processor.tokenizer.pad_token_id
        self._loader = torch.utils.data.DataLoader(
            _Draws(dataset, seed), batch_sampler=_RankBatches(order, self.position, batch_size, rank, world),
            num_workers=num_workers, collate_fn=_CollateDraws(pad_id), prefetch_factor=2 if num_workers else None)
        self._it = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = iter(self._loader)
        batch, bad = next(self._it)
        if UNUSABLE in batch:
            q, reasons = batch[UNUSABLE]
            raise GraceError(describe_unusable(f"{MAX_DRAWS} draws in a row were unusable at stream position {q}",
                                               collections.Counter(reasons), self.dataset))
        for rec, reason in bad:
            self.bad.setdefault(int(rec), reason)
        self.position += self._step
        return batch

    @property
    def skipped(self) -> collections.Counter:
        return collections.Counter(self.bad.values())

    def state_dict(self) -> dict:
        return {"position": self.position, "bad": dict(self.bad)}

    def close(self) -> None:
        """Stop the worker processes (they also stop when the stream is garbage-collected)."""
        self._it = None


class _CollateDraws:
    """Picklable collate function (spawned workers receive it by pickle)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list) -> tuple[dict, list]:
        bad = [b for _, draws in items for b in draws]
        unusable = next((s for s, _ in items if UNUSABLE in s), None)
        if unusable is not None:
            return unusable, bad
        return collate([s for s, _ in items], self.pad_id), bad


def build_loader(cfg, dataset: ConversationDataset, rank: int, world: int, state: dict | None = None) -> SampleStream:
    """The trainer's stream for ``cfg`` (batch_size per rank, seed, num_workers, group_by_length);
    ``state``: a :meth:`SampleStream.state_dict` from a checkpoint, or None to start at the beginning."""
    return SampleStream(dataset, batch_size=cfg.batch_size, seed=cfg.seed, rank=rank, world=world,
                        num_workers=cfg.num_workers, group_by_length=cfg.group_by_length, state=state)
