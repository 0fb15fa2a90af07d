"""Header checks of image files: an empty, truncated or non-image file is found when a run starts, in seconds.

A run that reads a data set straight from its folder (config.data.root) checks every listed image once, before it
builds a model: the file must be non-empty, start with the signature of a format the pipeline decodes (JPEG, PNG,
BMP, GIF, WebP), have a header that parses to positive dimensions, and be as long as its header says (JPEG: an
end-of-image marker after the scan starts and PNG's IEND chunk, each within the last `TAIL_BYTES`; BMP: the pixel
array its header sizes; WebP: the RIFF size; GIF: the header only). Only the header and the last
bytes are read, not the pixels: the full decode is `python -m input_pipeline.prepare`'s job, which decodes every
image once while building a prepared folder.

Knows nothing of JAX or TensorFlow.
"""

import concurrent.futures
import dataclasses
import os
import struct
import time
from typing import Callable, Optional, Sequence

TAIL_BYTES = 4096  # JPEG's end-of-image marker and PNG's IEND chunk must lie in the file's last 4 KiB (padding after
# them, which some writers add and decoders ignore, is allowed up to that).
FORMATS = "JPEG, PNG, BMP, GIF or WebP"  # what pipeline.decode reads (tf.io.decode_image).
_THREADS = 16  # header reads wait on the disk (or a network file system), not the CPU.


@dataclasses.dataclass(frozen=True)
class Corrupt:
  """An image that failed its header check: the file and why."""
  path: str
  reason: str  # e.g. "is empty (0 bytes)", "is truncated (no JPEG end-of-image marker)".

  def __str__(self) -> str:
    return f"Image {self.path} {self.reason}"


def _jpeg(f, size: int) -> Optional[str]:
  f.seek(2)
  dims = None
  while True:
    marker = f.read(2)
    while len(marker) == 2 and marker[0] == 0xFF and marker[1] == 0xFF:  # fill bytes before a marker
      marker = marker[1:] + f.read(1)
    if len(marker) < 2 or marker[0] != 0xFF:
      return "is truncated or corrupt (its JPEG header ends before the image data)"
    code = marker[1]
    if code in (0xD8, 0x01) or 0xD0 <= code <= 0xD7:  # markers without a length field
      continue
    raw = f.read(2)
    if len(raw) < 2:
      return "is truncated (inside its JPEG header)"
    (length,) = struct.unpack(">H", raw)
    if length < 2:
      return "is corrupt (a JPEG header segment of length < 2)"
    if 0xC0 <= code <= 0xCF and code not in (0xC4, 0xC8, 0xCC):  # start of frame: precision, height, width
      frame = f.read(5)
      if len(frame) < 5:
        return "is truncated (inside its JPEG frame header)"
      _, height, width = struct.unpack(">BHH", frame)
      dims = (height, width)
      f.seek(length - 7, os.SEEK_CUR)
      continue
    if code == 0xDA:  # start of scan: the entropy-coded data follow.
      if dims is None:
        return "is corrupt (no JPEG frame header before the image data)"
      if dims[1] == 0:  # height 0 is legal (a DNL marker gives it later); width 0 is not.
        return "is corrupt (its JPEG header gives width 0)"
      scan_start = f.tell() + length - 2
      if scan_start >= size:
        return "is truncated (no JPEG image data after the header)"
      tail_start = max(scan_start, size - TAIL_BYTES)
      f.seek(tail_start)
      if b"\xff\xd9" not in f.read():
        return "is truncated (no JPEG end-of-image marker: the file was cut short)"
      return None
    f.seek(length - 2, os.SEEK_CUR)
    if f.tell() > size:
      return "is truncated (inside its JPEG header)"


def _png(f, size: int) -> Optional[str]:
  f.seek(8)
  head = f.read(16)
  if len(head) < 16 or head[4:8] != b"IHDR":
    return "is truncated or corrupt (no PNG IHDR header)"
  width, height = struct.unpack(">II", head[8:16])
  if width == 0 or height == 0:
    return f"is corrupt (its PNG header gives {width} x {height} pixels)"
  if size < 8 + 25 + 12:
    return "is truncated (shorter than a PNG header and end chunk)"
  f.seek(max(0, size - TAIL_BYTES))
  if b"IEND\xaeB`\x82" not in f.read():
    return "is truncated (no PNG IEND chunk at its end: the file was cut short)"
  return None


def _bmp(f, size: int) -> Optional[str]:
  f.seek(0)
  head = f.read(54)
  if len(head) < 26:
    return "is truncated (inside its BMP header)"
  offset, dib = struct.unpack("<I", head[10:14])[0], struct.unpack("<I", head[14:18])[0]
  if dib == 12:  # OS/2 BITMAPCOREHEADER: 16-bit unsigned sizes
    width, height = struct.unpack("<HH", head[18:22])
    bpp, compression = struct.unpack("<H", head[24:26])[0], 0
  elif dib >= 40 and len(head) >= 34:
    width, height = struct.unpack("<ii", head[18:26])
    bpp, compression = struct.unpack("<HI", head[28:34])
  else:
    return f"is corrupt (a BMP header of {dib} bytes)"
  if width <= 0 or height == 0:
    return f"is corrupt (its BMP header gives {width} x {height} pixels)"
  if offset >= size:
    return "is truncated (its BMP pixel data start past the end of the file)"
  if compression in (0, 3, 6) and bpp in (1, 4, 8, 16, 24, 32):  # uncompressed rows, padded to 4 bytes
    needed = offset + ((width * bpp + 31) // 32) * 4 * abs(height)
    if size < needed:
      return f"is truncated ({size} bytes, its BMP header needs {needed})"
  return None


def _gif(f, size: int) -> Optional[str]:
  f.seek(6)
  dims = f.read(4)
  if len(dims) < 4:
    return "is truncated (inside its GIF header)"
  width, height = struct.unpack("<HH", dims)
  if width == 0 or height == 0:
    return f"is corrupt (its GIF header gives {width} x {height} pixels)"
  return None  # no length check: decoders read a GIF cut short after its first frame (its trailer is optional).


def _webp(f, size: int) -> Optional[str]:
  f.seek(4)
  (riff_size,) = struct.unpack("<I", f.read(4))
  if riff_size + 8 > size:
    return f"is truncated ({size} bytes, its RIFF header says {riff_size + 8})"
  return None


_SIGNATURES: tuple[tuple[bytes, Callable], ...] = (
    (b"\xff\xd8", _jpeg), (b"\x89PNG\r\n\x1a\n", _png), (b"BM", _bmp), (b"GIF87a", _gif), (b"GIF89a", _gif))


def check_file(path: str) -> Optional[str]:
  """Why the image at `path` cannot be decoded ("is empty (0 bytes)", "is truncated (...)", ...), or None when its
  header and length are those of a whole JPEG, PNG, BMP, GIF or WebP image."""
  try:
    size = os.path.getsize(path)
    if size == 0:
      return "is empty (0 bytes)"
    with open(path, "rb") as f:
      head = f.read(16)
      if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _webp(f, size)
      for signature, check in _SIGNATURES:
        if head.startswith(signature):
          return check(f, size)
  except FileNotFoundError:
    return "does not exist"
  except OSError as e:
    return f"cannot be read ({e.strerror or e})"
  except struct.error:
    return "is truncated (inside its header)"
  return f"is not a {FORMATS} image (it starts with {head[:8]!r})"


@dataclasses.dataclass(frozen=True)
class Summary:
  """What `check_files` found: how many images, which failed, and how long it took."""
  num_checked: int
  corrupt: tuple  # Corrupt, in the order of the paths.
  seconds: float

  def describe(self, what: str = "images") -> str:
    head = f"header check of {self.num_checked:,} {what} in {self.seconds:.1f} s: "
    if not self.corrupt:
      return head + "all readable"
    shown = "; ".join(str(c) for c in self.corrupt[:5])
    more = f" (and {len(self.corrupt) - 5} more)" if len(self.corrupt) > 5 else ""
    return head + f"{len(self.corrupt)} unreadable: {shown}{more}"


def check_files(paths: Sequence[str], threads: int = _THREADS) -> Summary:
  """Checks every file of `paths` (`check_file`), `threads` at a time; returns a Summary in the paths' order."""
  start = time.perf_counter()
  unique = list(dict.fromkeys(paths))
  if threads > 1 and len(unique) > 64:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      reasons = dict(zip(unique, pool.map(check_file, unique, chunksize=64)))
  else:
    reasons = {p: check_file(p) for p in unique}
  corrupt = tuple(Corrupt(p, reasons[p]) for p in unique if reasons[p] is not None)
  return Summary(num_checked=len(unique), corrupt=corrupt, seconds=time.perf_counter() - start)


def corrupt_message(corrupt: Sequence[Corrupt], opt_out: str) -> str:
  """The one-line error for unreadable images: the first ones by name, the fix, and the opt-out (`opt_out`, e.g.
  "--skip_corrupt" for prepare or "--config.data.skip_corrupt=true" for main.py) that leaves them out, counted."""
  if len(corrupt) == 1:
    return f"{corrupt[0]}: re-download it, or pass {opt_out} to leave it out (counted)."
  shown = "; ".join(str(c) for c in corrupt[:5]) + (f"; and {len(corrupt) - 5} more" if len(corrupt) > 5 else "")
  return f"{len(corrupt)} images are unreadable: {shown}. Re-download them, or pass {opt_out} to leave them out " \
         "(counted)."
