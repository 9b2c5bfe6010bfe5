"""LLaVA-format conversation data, read lazily: a compact record index built at start-up, each sample
encoded (image opened, chat template rendered, tokenized, labels built) only when a DataLoader worker
needs it, in a deterministic order that does not depend on the number of workers or ranks.

Format (ShareGPT4V / LLaVA mixtures): a JSON list of
    {"id": ..., "image": "relative/path.png", "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                                 {"from": "gpt", "value": "..."}, ...]}

Bad samples (empty or malformed conversation, no assistant turn, image and ``<image>`` placeholder not
matching, missing or unreadable image, longer than ``max_length``, ...) are never trained on and never
fatal: they are found when drawn, counted by reason and replaced by a substitute chosen from the stream
position alone (see :class:`SampleStream`).

Memory: at 665k records a list of dicts costs gigabytes per process, and every DataLoader worker copies
the pages that reference counting touches. The index instead keeps each record's byte range in the
JSON file (two int64 arrays, plus one bool per record) and re-parses that slice with ``json.loads``
when the sample is drawn.
"""

from __future__ import annotations

import array
import collections
import json
import os
import re

import numpy as np
import torch
from PIL import Image

IGNORE = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
MAX_DRAWS = 64          # draws per stream position before the data is declared unusable
MAX_RECORD_BYTES = 1 << 26   # a longer list element is taken for invalid JSON rather than read on
GROUP_CHUNK = 64        # micro-batches per length-sorted chunk when grouping by length
_WS = re.compile(r"[ \t\n\r]*")
_SEP = re.compile(r"[ \t\n\r]*,[ \t\n\r]*")


class SkipSample(Exception):
    """A record that cannot be trained on or evaluated; ``reason`` is the key it is counted under."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def load_records(path: str) -> list[dict]:
    """The whole JSON list in memory (evaluation sets); training reads through :class:`RecordIndex`."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversation records")
    return data


def to_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA turns ({"from": "human"|"gpt", "value"}) as chat-template messages; the ``<image>`` placeholder
    becomes an image content item. Raises ValueError on a malformed turn."""
    msgs = []
    for turn in conversations:
        role = ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        text = turn.get("value") if isinstance(turn, dict) else None
        if role is None or not isinstance(text, str):
            raise ValueError("malformed turn")
        content = []
        if "<image>" in text:
            content.append({"type": "image"})
            text = text.replace("<image>", "").strip()
        content.append({"type": "text", "text": text})
        msgs.append({"role": role, "content": content})
    return msgs


def parse_record(rec) -> tuple[list[dict], str | None]:
    """(chat messages, image path or None) of a record, or SkipSample with the reason it is unusable:
    empty or malformed conversation, no assistant turn, no user turn before the first assistant turn,
    an image without exactly one ``<image>`` placeholder, or a placeholder without an image. Opens nothing."""
    convs = rec.get("conversations") if isinstance(rec, dict) else None
    if not isinstance(convs, list) or not convs:
        raise SkipSample("empty conversation")
    try:
        msgs = to_messages(convs)
    except ValueError:
        raise SkipSample("malformed conversation") from None
    first = next((i for i, m in enumerate(msgs) if m["role"] == "assistant"), None)
    if first is None:
        raise SkipSample("no assistant turn")
    if first == 0:
        raise SkipSample("no user turn before the first assistant turn")
    image = rec.get("image") or None
    if image is not None and not isinstance(image, str):
        raise SkipSample("malformed conversation")
    n_items = sum(c["type"] == "image" for m in msgs for c in m["content"])
    if image is not None and n_items != 1:
        raise SkipSample("image without exactly one <image> token")
    if image is None and n_items:
        raise SkipSample("<image> token without an image")
    return msgs, image


def load_image(path: str) -> Image.Image:
    """The image at ``path`` as RGB; SkipSample("missing or unreadable image") when it cannot be decoded."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        raise SkipSample("missing or unreadable image") from None


def _scan_json_list(path: str, chunk_bytes: int = 1 << 24, start: int | None = None, stop: int | None = None):
    """Yield (start, end, record) for each element of the JSON list in ``path``, [start, end) its byte
    range; from the element at byte ``start`` when given (else from the list's opening bracket), and when
    the next element would start at or after ``stop``, a last (position, -1, None) instead of it. Holds
    about two chunks of text at a time (more while one record is longer than a chunk, up to
    MAX_RECORD_BYTES; invalid JSON raises ValueError once that much or the rest of the file is read). The text is
    decoded as latin-1 so that string offsets are byte offsets; that mis-decodes non-ASCII characters
    inside strings, which the index never reads (a drawn record is re-parsed as UTF-8 from its range)."""
    decoder = json.JSONDecoder()
    with open(path, "rb") as f:
        buf, base, eof = "", start or 0, False
        f.seek(base)

        def more(pos: int) -> tuple[int, bool]:
            nonlocal buf, base, eof
            if eof:
                return pos, False
            data = f.read(chunk_bytes)
            eof = len(data) < chunk_bytes
            buf, base = buf[pos:] + data.decode("latin-1"), base + pos
            return 0, bool(data)

        def skip_ws(pos: int) -> int:
            while True:
                pos = _WS.match(buf, pos).end()
                if pos < len(buf):
                    return pos
                pos, got = more(pos)
                if not got:
                    return pos

        pos = skip_ws(0)
        if start is None:
            if pos >= len(buf) or buf[pos] != "[":
                raise ValueError(f"{path}: expected a JSON list of conversation records")
            pos = skip_ws(pos + 1)
            if pos < len(buf) and buf[pos] == "]":
                return
        while True:
            if stop is not None and base + pos >= stop:
                yield base + pos, -1, None
                return
            try:
                rec, end = decoder.raw_decode(buf, pos)
                if end == len(buf) and not eof:   # a number or literal may continue in the next chunk
                    raise json.JSONDecodeError("chunk end", buf, end)
            except json.JSONDecodeError as e:
                if eof or len(buf) - pos > MAX_RECORD_BYTES:
                    raise ValueError(f"{path}: invalid JSON at byte {base + e.pos}: {e.msg}") from None
                pos, _ = more(pos)
                continue
            yield base + pos, base + end, rec
            sep = _SEP.match(buf, end)   # the common case in one regex call: ", " then the next record
            if sep is not None and sep.end() < len(buf):
                pos = sep.end()
                continue
            pos = skip_ws(end)
            if pos < len(buf) and buf[pos] == ",":
                pos = skip_ws(pos + 1)
            elif pos < len(buf) and buf[pos] == "]":
                return
            else:
                raise ValueError(f"{path}: invalid JSON at byte {base + pos}: expected ',' or ']'")


class RecordIndex:
    """The records of a conversation JSON, compactly: record i is the byte range
    [starts[i], ends[i]) of the source (a file, read with ``os.pread`` when drawn, or one bytes buffer
    for records given in memory), ``has_image[i]`` whether it names an image: 17 bytes per record.
    Indexing parses each record (in C, by ``json``) to find where it ends and drops the objects at
    once; the record checks (:func:`parse_record`) run when the record is drawn.

    Pickles without the data of a file source (DataLoader workers started by spawn reopen the file)."""

    def __init__(self, source: str | bytes, starts: np.ndarray, ends: np.ndarray, has_image: np.ndarray):
        self.source, self.starts, self.ends, self.has_image = source, starts, ends, has_image
        self._size = os.path.getsize(source) if isinstance(source, str) else len(source)
        self._fd, self._fd_pid = None, None

    @classmethod
    def from_json(cls, path: str, chunk_bytes: int = 1 << 24, processes: int | None = None) -> RecordIndex:
        """Index the JSON list at ``path``: streamed, about 3 * chunk_bytes of text held per process, in
        ``processes`` byte ranges parsed in parallel (None: one per CPU up to 8 for files over 64 MB, else
        one). A range starts where ``}, {`` is found after its nominal start: a guess, which may lie
        inside a string; it is kept only if the previous range's parse ends exactly there, and the range
        is parsed again from where the previous one ended otherwise, so the index never depends on the
        guess. Raises ValueError for a file that is not a JSON list."""
        size = os.path.getsize(path)
        if processes is None:
            processes = min(8, os.cpu_count() or 1) if size > 1 << 26 else 1
        first = next(_scan_json_list(path, chunk_bytes, stop=0), None)   # validates the opening bracket
        if first is None:   # an empty list
            return cls(path, *(np.zeros(0, t) for t in (np.int64, np.int64, np.bool_)))
        guesses = sorted({g for g in (_record_start_after(path, i * size // processes)
                                      for i in range(1, processes)) if g is not None and g > first[0]})
        bounds = [first[0], *guesses, None]
        ranges = [(path, chunk_bytes, a, b, a != first[0]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        if len(ranges) > 1:
            import multiprocessing

            with multiprocessing.Pool(len(ranges)) as pool:
                parts = pool.map(_index_range, ranges)
        else:
            parts = [_index_range(ranges[0])]
        kept, pos = [], first[0]
        for (_, _, a, b, _), part in zip(ranges, parts, strict=True):
            if pos is None:   # the list ended inside an earlier range: this guess lay in a string
                break
            if a != pos or part is None:
                part = _index_range((path, chunk_bytes, pos, b, False))
            kept.append(part)
            pos = part[3]
        return cls(path, *(np.concatenate([p[k] for p in kept]) for k in range(3)))

    @classmethod
    def from_records(cls, records: list) -> RecordIndex:
        """Index records given in memory (each re-serialised into one bytes buffer). Raises TypeError when
        ``records`` is not a list or a record is not JSON-serialisable."""
        if not isinstance(records, list):
            raise TypeError(f"records must be a list of conversation records, got {type(records).__name__}")
        blobs = [json.dumps(rec, ensure_ascii=False).encode() for rec in records]
        ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        has_image = np.array([isinstance(r, dict) and bool(r.get("image")) for r in records], np.bool_)
        return cls(b"".join(blobs), ends - [len(b) for b in blobs], ends, has_image)

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def nbytes(self) -> int:
        """Bytes the index holds per process (the record text of a file source stays on disk)."""
        held = 0 if isinstance(self.source, str) else len(self.source)
        return self.starts.nbytes + self.ends.nbytes + self.has_image.nbytes + held

    def lengths(self) -> np.ndarray:
        """Bytes of each record's JSON: a tokenizer-free proxy of its length, int64 [len(self)]."""
        return self.ends - self.starts

    def __getitem__(self, i: int) -> dict:
        start, end = int(self.starts[i]), int(self.ends[i])
        if isinstance(self.source, bytes):
            return json.loads(self.source[start:end])
        if self._fd is None or self._fd_pid != os.getpid():
            if os.path.getsize(self.source) != self._size:
                raise RuntimeError(f"{self.source} changed size since it was indexed; restart the run")
            self._fd, self._fd_pid = os.open(self.source, os.O_RDONLY), os.getpid()
        return json.loads(os.pread(self._fd, end - start, start))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_fd_pid": None}

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._fd_pid == os.getpid():
            os.close(self._fd)


def _index_range(task: tuple) -> tuple | None:
    """(starts, ends, has_image, where the next record starts or None at the list's end) of the records
    starting in [start, stop) of a JSON list; task = (path, chunk_bytes, start, stop or None, whether start
    is a guess). None when a guessed start turns out not to be one."""
    path, chunk_bytes, start, stop, guessed = task
    # array.array appends machine integers: no Python object per record survives the loop.
    starts, ends, has_image = array.array("q"), array.array("q"), array.array("b")
    after = None
    try:
        for a, b, rec in _scan_json_list(path, chunk_bytes, start=start, stop=stop):
            if b < 0:
                after = a
                break
            starts.append(a)
            ends.append(b)
            has_image.append(isinstance(rec, dict) and bool(rec.get("image")))
    except ValueError:
        if guessed:   # parsing from inside a string: the caller parses this range again from a known start
            return None
        raise
    return np.array(starts, np.int64), np.array(ends, np.int64), np.array(has_image, np.bool_), after


def _record_start_after(path: str, offset: int, window: int = 1 << 20) -> int | None:
    """Byte offset of the first ``{`` that follows ``}`` and a comma after ``offset``: probably, not surely,
    the start of a list element."""
    with open(path, "rb") as f:
        f.seek(offset)
        m = re.search(rb"\}[ \t\n\r]*,[ \t\n\r]*\{", f.read(window))
    return None if m is None else offset + m.end() - 1


class ConversationDataset(torch.utils.data.Dataset):
    """The records of a :class:`RecordIndex`, each checked and encoded on access.

    ``dataset[i]`` -> {"input_ids": int64 [T], "attention_mask": [T], "labels": int64 [T] (IGNORE outside
    the assistant turns), and the processor's image tensors ("pixel_values", "image_grid_thw") when the
    record has an image}, T <= max_length; raises SkipSample when the record is unusable (see
    :func:`parse_record`; also a missing or unreadable image, longer than max_length, rejected by the
    processor, or assistant turns that cannot be located, see :func:`assistant_labels`).

    ``cache=True`` keeps every encoded sample (and every skip) after its first access, in this process (each
    DataLoader worker holds its own): for small data read for many epochs, where encoding (the processor's
    image transforms and chat template, ~4 ms a sample on one CPU core) would cost as much as the training
    step. Memory grows with the data (~25 KB a sample for a 42 px image), so leave it off at real size.
    """

    def __init__(self, records: list[dict] | RecordIndex, processor, image_folder: str, max_length: int,
                 cache: bool = False):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.index = records if isinstance(records, RecordIndex) else RecordIndex.from_records(records)
        self.processor, self.image_folder, self.max_length = processor, image_folder, max_length
        self._cache: dict[int, dict | SkipSample] | None = {} if cache else None

    @classmethod
    def from_json(cls, path: str, processor, image_folder: str, max_length: int,
                  cache: bool = False) -> ConversationDataset:
        return cls(RecordIndex.from_json(path), processor, image_folder, max_length, cache)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        if self._cache is None:
            return self._encode(i)
        if i not in self._cache:
            try:
                self._cache[i] = self._encode(i)
            except SkipSample as skip:
                self._cache[i] = skip
        hit = self._cache[i]
        if isinstance(hit, SkipSample):
            raise SkipSample(hit.reason)
        # collate pads and stacks into new tensors, so handing out the cached ones is safe; the dict is copied
        return dict(hit)

    def _encode(self, i: int) -> dict:
        msgs, image_name = parse_record(self.index[i])
        image = load_image(os.path.join(self.image_folder, image_name)) if image_name else None
        text = self.processor.apply_chat_template(msgs, tokenize=False)
        try:
            enc = self.processor(text=[text], images=[image] if image is not None else None, return_tensors="pt")
        except ValueError:   # e.g. an image too small for the processor's patching
            raise SkipSample("processor rejected the sample") from None
        input_ids = enc["input_ids"][0]
        if input_ids.numel() > self.max_length:
            raise SkipSample("longer than max_length")
        sample = {k: v[0] for k, v in enc.items() if k not in ("pixel_values", "image_grid_thw") and v.dim() > 1}
        for key in ("pixel_values", "image_grid_thw"):
            if key in enc:
                sample[key] = enc[key]
        sample["labels"] = assistant_labels(self.processor, msgs, text, input_ids)
        return sample


def assistant_labels(processor, msgs: list[dict], text: str, input_ids: torch.Tensor) -> torch.Tensor:
    """Labels for ``input_ids`` (int64 [T], the processor's encoding of ``text``, the rendering of
    ``msgs``): the token id where the token holds a character of an assistant turn, IGNORE elsewhere.

    An assistant turn is the text its rendering adds after the generation prompt (its content and
    end-of-turn marker): characters [len(render(msgs[:k], generation prompt)), len(render(msgs[:k+1]))).
    Token boundaries come from one tokenization of the whole text with character offsets, never from
    tokenizing prefixes apart: a BPE or SentencePiece merge across a turn boundary cannot shift them (a
    token straddling the boundary, such as " red" after "ASSISTANT:", is supervised). The processor's
    ids are matched to the tokenizer's with image placeholder runs set aside, which checks that the
    processor only expanded placeholders. Raises SkipSample when the template renders a prefix that is
    not a prefix of the whole, or the processor's ids do not match the tokenizer's.
    """
    tok = processor.tokenizer
    spans = []
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        lo_text = processor.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=True)
        hi_text = processor.apply_chat_template(msgs[:k + 1], tokenize=False)
        if not (text.startswith(lo_text) and text.startswith(hi_text) and len(lo_text) <= len(hi_text)):
            raise SkipSample("chat template renders a conversation prefix inconsistently")
        spans.append((len(lo_text), len(hi_text)))
    plain = tok(text, return_offsets_mapping=True)
    plain_ids = np.asarray(plain["input_ids"], np.int64)
    offsets = np.asarray(plain["offset_mapping"], np.int64).reshape(-1, 2)
    supervised = np.zeros(len(plain_ids), bool)
    for lo, hi in spans:   # overlap with [lo, hi); special tokens added by the tokenizer have empty spans
        supervised |= (offsets[:, 1] > lo) & (offsets[:, 0] < hi) & (offsets[:, 1] > offsets[:, 0])
    ids = input_ids.numpy()
    placeholder = getattr(processor, "image_token", None)
    image_id = tok.convert_tokens_to_ids(placeholder) if placeholder else None
    keep_ids, keep_plain = ids != image_id, plain_ids != image_id
    if keep_ids.sum() != keep_plain.sum() or not np.array_equal(ids[keep_ids], plain_ids[keep_plain]):
        raise SkipSample("processor and tokenizer disagree on the text tokens")
    labels = np.full(len(ids), IGNORE, np.int64)
    labels[keep_ids] = np.where(supervised[keep_plain], ids[keep_ids], IGNORE)
    return torch.from_numpy(labels)


def collate(samples: list[dict], pad_id: int) -> dict:
    """Right-pad token tensors; concatenate the images of the samples that have one, in sample order (a
    model matches them to its image tokens in that order; Qwen2-VL's pixel_values are already flat patches)."""
    longest = max(s["input_ids"].numel() for s in samples)
    batch = {}
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("labels", IGNORE), ("mm_token_type_ids", 0)):
        if key in samples[0]:
            batch[key] = torch.stack([torch.nn.functional.pad(s[key], (0, longest - s[key].numel()), value=fill)
                                      for s in samples])
    for key in ("pixel_values", "image_grid_thw"):
        if any(key in s for s in samples):
            batch[key] = torch.cat([s[key] for s in samples if key in s])
    return batch


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


class _Draws(torch.utils.data.Dataset):
    """Worker side of the stream: item (q, record) -> (sample, [(record, reason) of the bad draws]). A bad
    record is replaced by draws seeded by (seed, q, attempt) only, so the sample at q is the same whichever
    worker or rank encodes it."""

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
        raise RuntimeError(f"{MAX_DRAWS} draws in a row were unusable at stream position {q} ({bad[:3]} ...): "
                           "check the image folder and the data")


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
        return collate([s for s, _ in items], self.pad_id), [b for _, bad in items for b in bad]


def build_loader(cfg, dataset: ConversationDataset, rank: int, world: int, state: dict | None = None) -> SampleStream:
    """The trainer's stream for ``cfg`` (batch_size per rank, seed, num_workers, group_by_length);
    ``state``: a :meth:`SampleStream.state_dict` from a checkpoint, or None to start at the beginning."""
    return SampleStream(dataset, batch_size=cfg.batch_size, seed=cfg.seed, rank=rank, world=world,
                        num_workers=cfg.num_workers, group_by_length=cfg.group_by_length, state=state)
