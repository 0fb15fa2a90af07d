"""Retrieval metrics of the VI-ReID protocols (FDNM_SPEC.md §4), ranked and scored on device.

`compute_metrics` gives the numbers of AGW's `eval_metrics.py` (`eval_sysu`, `eval_regdb`) and DEEN's `eval_llcm`
(with ties ranked in gallery order, and short ranked lists padded where those crash).

How, without sorting each query's gallery (on CPU, XLA's sort of a float32 [queries, gallery] matrix takes over ten
times longer than this whole computation): the gallery is laid out on the host grouped by identity, so a query's
true matches are one contiguous run of columns. The kept rank of a true match is 1 + the number of kept gallery items
ranked before it: one fused count over the gallery per kept match. Queries are scored in blocks sorted by their
number of kept true matches (known on the host), so a block loops over about as many matches as each query has. The
de-duplicated CMC needs the rank of the best true match in the list of identities: 1 + the number of identities with
a kept item ranked before it, from a prefix count over the identity-grouped columns read at the identity boundaries.
Removed gallery items get an order key after every distance. Time: O(Q * G * kept true matches per query).
"""

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fdnm_jax.errors import DataError

PROTOCOLS = ("sysu", "regdb", "llcm")
_REMOVED = np.iinfo(np.int32).max  # order key of a removed gallery item: after every distance, NaN included.
_NAN_KEY = 0x7FC00000  # order key of every NaN distance: after +inf (NumPy sorts NaN last).
_ROW_BLOCK = 256  # queries scored together inside a chunk (fastest on CPU for G ~ 3,000).
_PREFIX_BLOCK = 64  # width of the blocks of the matmul prefix count.
_IN_FLIGHT = 2  # chunks dispatched ahead of the results: bounds the memory to a few chunks of distances.
_MAX_GALLERY = 1 << 24  # prefix counts run in float32, exact below 2**24.


class _Gallery(NamedTuple):
  """The gallery grouped by identity (gallery order kept within an identity): NumPy or device arrays.

  Column j of the layout is gallery item `order[j]`. Identities are numbered 0..K-1 by sorted pid; the identity
  tables have N > K entries (a power of two), the ones past K-1 (K: a query pid absent from the gallery) empty.
  """
  order: Any  # int32 [G]: original gallery index of each column.
  ident: Any  # int32 [G]: identity of each column.
  cam: Any  # int32 [G]: camera of each column.
  id_start: Any  # int32 [N]: first column of identity k (0 for an empty entry).
  id_count: Any  # int32 [N]: number of gallery images of identity k.


@jax.jit
def pairwise_distance(query_emb: jax.Array, gallery_emb: jax.Array) -> jax.Array:
  """Retrieval distance of every query to every gallery item: minus the dot product of the embeddings as given.

  The references' distance (AGW's and DEEN's test code: `distmat = np.matmul(query_feat, gall_feat.T)`, ranked
  by -distmat): the model normalises each part of its embedding (evaluator.embedding_parts) and the test-time
  flip sums the image's and the mirror's embeddings without re-normalising, so the embedding is not re-normalised
  here either (for unit-norm embeddings this is minus the cosine similarity, FDNM_SPEC.md §4).

  Args:
    query_emb: float [Q, E] query embeddings.
    gallery_emb: float [G, E] gallery embeddings.
  Returns:
    float32 [Q, G]: -<q, g>; smaller = more similar.
  """
  q = query_emb.astype(jnp.float32)
  g = gallery_emb.astype(jnp.float32)
  return -jnp.matmul(q, g.T, precision=lax.Precision.HIGHEST)


@jax.jit
def euclidean_distance(query_emb: jax.Array, gallery_emb: jax.Array) -> jax.Array:
  """float32 [Q, G] Euclidean distances ||q - g|| of the embeddings as given (re-ranking's input), computed as
  sqrt(max(|q|^2 + |g|^2 - 2 <q, g>, 0))."""
  q = query_emb.astype(jnp.float32)
  g = gallery_emb.astype(jnp.float32)
  dot = jnp.matmul(q, g.T, precision=lax.Precision.HIGHEST)
  squared = jnp.sum(q * q, axis=1)[:, None] + jnp.sum(g * g, axis=1)[None, :] - 2.0 * dot
  return jnp.sqrt(jnp.maximum(squared, 0.0))


def _order_keys(dist: jax.Array) -> jax.Array:
  """int32 keys whose order is NumPy's order of the float32 distances (-0.0 == 0.0, every NaN last).

  Integer operations only: XLA on CPU flushes subnormal floats to zero in float comparisons, NumPy does not.
  """
  bits = lax.bitcast_convert_type(dist, jnp.int32)
  keys = jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: larger magnitude, smaller key.
  keys = jnp.where(bits == np.iinfo(np.int32).min, 0, keys)  # -0.0
  return jnp.where((bits & 0x7FFFFFFF) > 0x7F800000, _NAN_KEY, keys)


def _kept(xp: Any, protocol: str, q_ident: Any, q_cam: Any, g_ident: Any, g_cam: Any) -> Any:
  """bool, broadcast of the query and gallery arrays (NumPy with xp=np, JAX with xp=jnp): the items kept.

  sysu: a camera-3 query drops every camera-2 item (AGW's `eval_sysu`); llcm: drop the items of the query's
  identity and camera (DEEN's `eval_llcm`); regdb: keep everything.
  """
  if protocol == "sysu":
    return ~((q_cam == 3) & (g_cam == 2))
  if protocol == "llcm":
    return ~((q_ident == g_ident) & (q_cam == g_cam))
  return xp.ones(xp.broadcast_shapes(q_ident.shape, g_cam.shape), bool)


def _ranked_before(keys: jax.Array, order: jax.Array, key: jax.Array, index: jax.Array) -> jax.Array:
  """bool [B, G]: the columns ranked before the item (key [B], original gallery index [B]) of each row.

  Ascending key, ties in gallery order (a stable sort). Removed columns (key _REMOVED) never come first.
  """
  key, index = key[:, None], index[:, None]
  return (keys < key) | ((keys == key) & (order[None, :] < index))


def _match_ranks(keys: jax.Array, order: jax.Array, cols: jax.Array, num_matches: jax.Array) -> jax.Array:
  """int32 [B, slots]: 1-based rank in the kept list of each kept true match; _REMOVED past num_matches.

  Args:
    keys: int32 [B, G] order keys, removed columns at _REMOVED.
    order: int32 [G] original gallery index of each column.
    cols: int32 [B, slots] the columns of the query's kept true matches, first.
    num_matches: int32 [B] number of kept true matches.
  """

  def rank_match(s, ranks):
    col = cols[:, s]
    key = jnp.take_along_axis(keys, col[:, None], axis=1)[:, 0]
    before = _ranked_before(keys, order, key, order[col])
    rank = 1 + jnp.sum(before.astype(jnp.float32), axis=1).astype(jnp.int32)  # float32 sums vectorise better on CPU.
    return ranks.at[s].set(jnp.where(s < num_matches, rank, _REMOVED))

  ranks = jnp.full(cols.shape[::-1], _REMOVED, jnp.int32)
  return lax.fori_loop(0, jnp.max(num_matches), rank_match, ranks).T


def _prefix_count(mask: jax.Array) -> jax.Array:
  """float32 [B, G + 1]: number of True in mask[:, :j] at column j (block-wise matmul; exact for G < 2**24)."""
  rows, cols = mask.shape
  width = _PREFIX_BLOCK
  padded = -(-(cols + 1) // width) * width
  x = jnp.pad(mask.astype(jnp.float32), ((0, 0), (1, padded - cols - 1))).reshape(rows, padded // width, width)
  upper = lambda n, k: jnp.triu(jnp.ones((n, n), jnp.float32), k)
  within = jnp.matmul(x, upper(width, 0), precision=lax.Precision.HIGHEST)
  offsets = jnp.matmul(within[:, :, -1], upper(padded // width, 1), precision=lax.Precision.HIGHEST)
  return (within + offsets[:, :, None]).reshape(rows, padded)[:, :cols + 1]


def _identities_before(before: jax.Array, gallery: _Gallery) -> jax.Array:
  """int32 [B]: number of identities with at least one column in `before` (bool [B, G], identity-grouped)."""
  prefix = _prefix_count(before)
  per_identity = prefix[:, gallery.id_start + gallery.id_count] - prefix[:, gallery.id_start]
  return jnp.sum(per_identity > 0, axis=1, dtype=jnp.int32)


def _precision_scores(ranks: jax.Array, num_matches: jax.Array) -> tuple[jax.Array, jax.Array]:
  """AP = mean_j j / r_j and INP = n / r_n, float32 [B], from the match ranks (int32 [B, slots], _REMOVED-padded)."""
  sorted_ranks = jnp.sort(ranks, axis=1)
  hits = jnp.arange(1, ranks.shape[1] + 1, dtype=jnp.float32)
  precision = jnp.where(sorted_ranks != _REMOVED, hits / sorted_ranks.astype(jnp.float32), 0.0)
  n = jnp.maximum(num_matches, 1)
  last_rank = jnp.take_along_axis(sorted_ranks, (n - 1)[:, None], axis=1)[:, 0]
  return jnp.sum(precision, axis=1) / n, num_matches / last_rank.astype(jnp.float32)


def _identity_rank(keys: jax.Array, ranks: jax.Array, cols: jax.Array, gallery: _Gallery) -> jax.Array:
  """int32 [B]: rank of the best kept true match in the list of identities (each at its best kept image)."""
  best_col = jnp.take_along_axis(cols, jnp.argmin(ranks, axis=1)[:, None], axis=1)[:, 0]
  best_key = jnp.take_along_axis(keys, best_col[:, None], axis=1)[:, 0]
  before = _ranked_before(keys, gallery.order, best_key, gallery.order[best_col])
  return 1 + _identities_before(before, gallery)


def _score_block(dist: jax.Array, ident: jax.Array, cam: jax.Array, cols: jax.Array, num_matches: jax.Array,
                 gallery: _Gallery, protocol: str) -> dict[str, jax.Array]:
  """Per-query results of a block of queries; see `_score_chunk`."""
  keys = _order_keys(dist[:, gallery.order])
  kept = _kept(jnp, protocol, ident[:, None], cam[:, None], gallery.ident[None, :], gallery.cam[None, :])
  keys = jnp.where(kept, keys, _REMOVED)
  ranks = _match_ranks(keys, gallery.order, cols, num_matches)
  ap, inp = _precision_scores(ranks, num_matches)
  first_rank = jnp.min(ranks, axis=1) if protocol == "regdb" else _identity_rank(keys, ranks, cols, gallery)
  return {"ap": ap, "inp": inp, "first_rank": first_rank}


@partial(jax.jit, static_argnames="protocol")
def _score_chunk(dist: jax.Array, ident: jax.Array, cam: jax.Array, cols: jax.Array, num_matches: jax.Array,
                 gallery: _Gallery, protocol: str) -> dict[str, jax.Array]:
  """Per-query results of a chunk of queries.

  Args:
    dist: float32 [C, G] distances in original gallery order; C a multiple of the row block (or smaller).
    ident: int32 [C] query identity index (K or more when absent from the gallery); cam: int32 [C] query camera.
    cols, num_matches: int32 [C, slots] layout columns of the query's kept true matches (first) and their number.
  Returns:
    "ap" float32 [C], "inp" float32 [C] (meaningful where num_matches > 0), "first_rank" int32 [C]: rank of the
    first true match in the CMC list (the identity list for sysu and llcm, the kept image list for regdb).
  """
  block = min(_ROW_BLOCK, dist.shape[0])
  blocks = dist.shape[0] // block
  split = lambda x: x.reshape((blocks, block) + x.shape[1:])
  blocked = tuple(split(x) for x in (dist, ident, cam, cols, num_matches))
  out = lax.map(lambda a: _score_block(*a, gallery, protocol), blocked)
  return {k: v.reshape((blocks * block,) + v.shape[2:]) for k, v in out.items()}


def _power_of_two(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def _gallery_layout(g_pids: np.ndarray, g_camids: np.ndarray) -> tuple[_Gallery, np.ndarray]:
  """The identity-grouped layout (NumPy int32) and the sorted distinct gallery pids [K]."""
  pids, ident, counts = np.unique(g_pids, return_inverse=True, return_counts=True)
  order = np.argsort(ident, kind="stable")
  id_count = np.zeros(_power_of_two(len(pids) + 1), np.int32)
  id_count[:len(pids)] = counts
  id_start = np.cumsum(id_count) - id_count
  id_start[len(pids):] = 0
  layout = _Gallery(order=order, ident=ident[order], cam=g_camids[order], id_start=id_start, id_count=id_count)
  return _Gallery(*(np.asarray(x, np.int32) for x in layout)), pids


def _match_columns(gallery: _Gallery, q_ident: np.ndarray, q_cam: np.ndarray,
                   protocol: str) -> tuple[np.ndarray, np.ndarray]:
  """int32 [Q, slots] layout columns of each query's kept true matches (first, in gallery order) and [Q] their number.

  slots: the next power of two >= the most images of one identity (at least 8, at most G).
  """
  num_gallery = len(gallery.order)
  slots = min(num_gallery, max(8, _power_of_two(int(gallery.id_count.max()))))
  slot = np.arange(slots)
  cols = np.minimum(gallery.id_start[q_ident][:, None] + slot, num_gallery - 1)
  kept = (slot < gallery.id_count[q_ident][:, None]) & _kept(np, protocol, q_ident[:, None], q_cam[:, None],
                                                              gallery.ident[cols], gallery.cam[cols])
  cols = np.take_along_axis(cols, np.argsort(~kept, axis=1, kind="stable"), axis=1)
  return cols.astype(np.int32), kept.sum(axis=1).astype(np.int32)


def _query_identities(q_pids: np.ndarray, gallery_pids: np.ndarray) -> np.ndarray:
  """int32 [Q]: index of each query pid in the sorted gallery pids [K], K where it is not there."""
  pos = np.minimum(np.searchsorted(gallery_pids, q_pids), len(gallery_pids) - 1)
  return np.where(gallery_pids[pos] == q_pids, pos, len(gallery_pids)).astype(np.int32)


def _rows(distmat: Any, rows: np.ndarray, size: int) -> Any:
  """float32 [size, G]: the given rows of distmat (NumPy or JAX), then zero rows."""
  xp = jnp if isinstance(distmat, jax.Array) else np
  picked = distmat[xp.asarray(rows)].astype(xp.float32, copy=False)
  return picked if len(rows) == size else xp.pad(picked, ((0, size - len(rows)), (0, 0)))


def _padded(x: np.ndarray, size: int, fill: int) -> np.ndarray:
  return np.concatenate([x, np.full((size - len(x),) + x.shape[1:], fill, x.dtype)])


def _chunk_size(query_chunk: int, num_query: int) -> int:
  size = min(query_chunk, num_query)
  return size if size <= _ROW_BLOCK else -(-size // _ROW_BLOCK) * _ROW_BLOCK


def _score_queries(distmat: Any, q_ident: np.ndarray, q_cam: np.ndarray, gallery: _Gallery, protocol: str,
                   query_chunk: int) -> dict[str, np.ndarray]:
  """Per-query "num_matches" and the results of `_score_chunk`, NumPy [Q], chunk by chunk (one compilation).

  The queries are scored in the order of their number of kept true matches, so that the queries of a block loop
  over about as many matches each; the results come back in query order.
  """
  num_query = distmat.shape[0]
  size = _chunk_size(query_chunk, num_query)
  cols, num_matches = _match_columns(gallery, q_ident, q_cam, protocol)
  device_gallery = jax.tree.map(jnp.asarray, gallery)
  by_work = np.argsort(num_matches, kind="stable")
  absent = len(gallery.id_count) - 1
  outs = []
  for start in range(0, num_query, size):
    if len(outs) >= _IN_FLIGHT:
      jax.block_until_ready(outs[-_IN_FLIGHT])
    rows = by_work[start:start + size]
    outs.append(_score_chunk(_rows(distmat, rows, size), _padded(q_ident[rows], size, absent),
                             _padded(q_cam[rows], size, 0), _padded(cols[rows], size, 0),
                             _padded(num_matches[rows], size, 0), device_gallery, protocol=protocol))
  outs = jax.device_get(outs)
  results = {"num_matches": num_matches}
  for k in outs[0]:
    results[k] = np.empty(num_query, outs[0][k].dtype)
    results[k][by_work] = np.concatenate([o[k] for o in outs])[:num_query]
  return results


def _check_inputs(distmat: Any, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
                  g_camids: np.ndarray, protocol: str, max_rank: int, query_chunk: int) -> None:
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol {protocol!r} is not supported: use one of {PROTOCOLS}")
  if len(distmat.shape) != 2 or 0 in distmat.shape:
    raise ValueError(f"distmat must be a non-empty [num_query, num_gallery] matrix, got shape {distmat.shape}")
  num_query, num_gallery = distmat.shape
  for name, x, n in (("q_pids", q_pids, num_query), ("q_camids", q_camids, num_query),
                     ("g_pids", g_pids, num_gallery), ("g_camids", g_camids, num_gallery)):
    if x.shape != (n,):
      raise ValueError(f"{name} must have shape ({n},) to match distmat {distmat.shape}, got {x.shape}")
  if num_gallery >= _MAX_GALLERY:
    raise ValueError(f"gallery of {num_gallery} items: at most {_MAX_GALLERY - 1} are supported")
  if max_rank < 1 or query_chunk < 1:
    raise ValueError(f"max_rank ({max_rank}) and query_chunk ({query_chunk}) must be >= 1")


def compute_metrics(distmat: Any, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any, protocol: str,
                    max_rank: int = 20, query_chunk: int = 1024) -> dict[str, Any]:
  """CMC, mAP and mINP of a retrieval under the sysu, regdb or llcm protocol (FDNM_SPEC.md §4).

  The numbers of AGW's `eval_sysu` / `eval_regdb` and DEEN's `eval_llcm`: rank the gallery by ascending distance
  (ties in gallery order); drop what the protocol removes (sysu: every camera-2 item for a camera-3 query; llcm:
  the items of the query's pid and camera; regdb: nothing); then on the kept list AP = mean_j j / r_j and
  INP = n / r_n over the n true matches at 1-based ranks r_1 < ... < r_n. The CMC of a query is 1 from the rank of
  its first true match: in the list of distinct identities (each at its best kept image) for sysu and llcm, in the
  kept image list for regdb; past the end of a short list it keeps its last value. Queries without a kept true
  match are skipped. Distances are compared in float32 (NaN ranks last). Time grows as Q * G * (kept true matches
  per query): fine for ReID galleries (tens of images per identity), slow for thousands of images of one identity.

  Args:
    distmat: float [Q, G] NumPy or JAX array, smaller = more similar (e.g. `pairwise_distance`).
    q_pids, g_pids: [Q] and [G] person ids (any comparable dtype).
    q_camids, g_camids: [Q] and [G] integer camera ids (SYSU-MM01: 1..6).
    protocol: "sysu", "regdb" or "llcm".
    max_rank: length of the CMC curve.
    query_chunk: queries ranked per device call, two calls in flight: the memory beyond distmat is
      O(query_chunk * G). Above 256 it is rounded up to a multiple of 256. One compilation per protocol, chunk size,
      G, and powers of two above the number of gallery identities and the most images of one identity.
  Returns:
    {"cmc": float64 NumPy [max_rank] (fractions; cmc[k-1] = Rank-k), "mAP": float, "mINP": float (fractions),
     "num_valid_queries": int}.
  Raises:
    ValueError: unknown protocol, inconsistent shapes, or no query with a kept true match.
  """
  if not isinstance(distmat, jax.Array):
    distmat = np.asarray(distmat)
  q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
  q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
  _check_inputs(distmat, q_pids, g_pids, q_camids, g_camids, protocol, max_rank, query_chunk)
  gallery, gallery_pids = _gallery_layout(g_pids, g_camids)
  q_ident = _query_identities(q_pids, gallery_pids)
  per_query = _score_queries(distmat, q_ident, q_camids.astype(np.int32), gallery, protocol, query_chunk)
  valid = per_query["num_matches"] > 0
  if not valid.any():
    raise DataError(f"no query has a true match left in the gallery under protocol {protocol!r}: every query "
                    "pid is absent from g_pids or all its gallery images are removed by the protocol")
  first_rank = per_query["first_rank"][valid]
  cmc = (first_rank[:, None] <= np.arange(1, max_rank + 1)[None, :]).mean(axis=0, dtype=np.float64)
  return {"cmc": cmc, "mAP": float(per_query["ap"][valid].astype(np.float64).mean()),
          "mINP": float(per_query["inp"][valid].astype(np.float64).mean()), "num_valid_queries": int(valid.sum())}
