"""The record index: where each record of a LLaVA conversation JSON list lies in the file, found by one
streamed parse at start-up (:class:`RecordIndex`), and :func:`load_records` for small evaluation sets.

Memory: at 665k records a list of dicts costs gigabytes per process, and every DataLoader worker copies
the pages that reference counting touches. The index instead keeps each record's byte range in the
JSON file (two int64 arrays, plus one bool per record) and re-parses that slice with ``json.loads``
when the sample is drawn.
"""

from __future__ import annotations

import array
import codecs
import json
import os
import re

import numpy as np

from grace.errors import GraceError

MAX_RECORD_BYTES = 1 << 26   # a longer list element is taken for invalid JSON rather than read on
UTF8_SLICE = 1 << 16         # bytes validated as UTF-8 at a time
_WS = re.compile(r"[ \t\n\r]*")
_SEP = re.compile(r"[ \t\n\r]*,[ \t\n\r]*")


def load_records(path: str) -> list[dict]:
    """The whole JSON list in memory (evaluation sets); training reads through :class:`RecordIndex`."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversation records")
    return data

def _scan_json_list(path: str, chunk_bytes: int = 1 << 24, start: int | None = None, stop: int | None = None):
    """Yield (start, end, record) for each element of the JSON list in ``path``, [start, end) its byte
    range; from the element at byte ``start`` when given (else from the list's opening bracket), and when
    the next element would start at or after ``stop``, a last (position, -1, None) instead of it. Holds
    about two chunks of text at a time (more while one record is longer than a chunk, up to
    MAX_RECORD_BYTES; invalid JSON raises ValueError once that much or the rest of the file is read). The text is
    decoded as latin-1 so that string offsets are byte offsets; that mis-decodes non-ASCII characters
    inside strings, which the index never reads (a drawn record is re-parsed as UTF-8 from its range)."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        buf, base, eof = "", start or 0, False
        f.seek(base)

        def more(pos: int) -> tuple[int, bool]:
            nonlocal buf, base, eof
            if eof:
                return pos, False
            at = f.tell()
            data = f.read(chunk_bytes)
            eof = len(data) < chunk_bytes
            _check_utf8(utf8, data, eof, at, path)
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

def _check_utf8(decoder, data: bytes, final: bool, at: int, path: str) -> None:
    """Feed ``data`` (the bytes at file offset ``at``) to an incremental UTF-8 ``decoder``; GraceError naming
    the first byte that is not UTF-8 and its offset. The decoder carries a character cut by a chunk end over
    to the next chunk. Fed in slices of UTF8_SLICE bytes, so the decoded text held at a time stays small
    beside the chunk."""
    view = memoryview(data)
    for lo in range(0, max(len(data), 1), UTF8_SLICE):
        piece = view[lo:lo + UTF8_SLICE]
        pending = len(decoder.getstate()[0])
        try:
            decoder.decode(piece, final and lo + UTF8_SLICE >= len(data))
        except UnicodeDecodeError as e:
            # e.object is the carried-over bytes followed by this piece
            raise GraceError(f"{path} is not UTF-8: byte 0x{e.object[e.start]:02x} at offset "
                             f"{at + lo - pending + e.start} (Latin-1 or Windows-1252 text?); convert the file "
                             "to UTF-8") from None


def check_encoding(path: str) -> None:
    """Refuse, naming the encoding, a file that starts with a byte-order mark or NUL bytes: JSON here is read
    as UTF-8 without a BOM (``json`` itself refuses the BOM), and a UTF-16/32 file would read as garbage."""
    with open(path, "rb") as f:
        head = f.read(4)
    for bom, name in ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF8, "UTF-8"),
                      (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16")):
        if head.startswith(bom):
            what = "UTF-8 byte-order mark (BOM)" if name == "UTF-8" else f"{name} byte-order mark: the file is {name}"
            raise GraceError(f"{path} starts with a {what}; save it as UTF-8 without a BOM")
    if b"\x00" in head:
        raise GraceError(f"{path} starts with NUL bytes: UTF-16 or UTF-32 text without a byte-order mark?; "
                         "save it as UTF-8")


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
        guess. Raises ValueError for a file that is not a JSON list, GraceError (naming the encoding or the
        byte offset) for one that is not UTF-8 without a BOM, and for a list of lists (``[[...]]``)."""
        check_encoding(path)
        index = cls._from_json(path, chunk_bytes, processes)
        if len(index) and not isinstance(index[0], dict):
            kind = "a JSON array" if isinstance(index[0], list) else f"a JSON {type(index[0]).__name__}"
            nested = " holds a list of lists ([[...]]):" if isinstance(index[0], list) else ":"
            raise GraceError(f"{path}{nested} element 0 is {kind}, not a conversation record (a JSON object); "
                             "the file must be one flat list of records")
        return index

    @classmethod
    def _from_json(cls, path: str, chunk_bytes: int, processes: int | None) -> RecordIndex:
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
