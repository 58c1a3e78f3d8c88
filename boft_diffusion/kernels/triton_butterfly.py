"""Triton kernels for x R (or x R^T), R = B_{m-1} ... B_0 a butterfly rotation: one streaming pass over
the rows per direction (forward: x -> y; backward: x, grad -> grad_x and the block gradients).

Why this shape of kernel: every factor of one rotation acts inside chunks of C = b * 2^(top)
consecutive features (top = widest active factor), so a (rows x G) tile, G a multiple of C,
can take all factors without seeing other tiles. Instead of m block-sparse passes with
permutes, a tiny prologue kernel multiplies the active factors of each G-chunk into one dense
G x G matrix M_k (the butterfly's restriction to that chunk, block-diagonal over C when
G > C; never the d x d R), and the streaming kernel is then one tensor-core dot per tile:
x is read once and y written once. G <= 128 keeps that dot at <= 128 MACs per element, far
under the memory time on any tensor-core GPU.

Backward needs one more observation: with y_k = x_k M_k per chunk, dL/dM_k = A_k = sum over
rows of x_k^T g_k (one G x G matrix per chunk), and for M = F_0' ... F_{L-1}' (F' the dense
chunk pieces of the active factors, in application order)

    dL/dF_j' = (F_0' ... F_{j-1}')^T  A  (F_{j+1}' ... F_{L-1}')^T,

so the per-row work is one streaming pass (grad_x = g M^T, and A += x^T g), and the factor
gradients come from G x G products per chunk, whose block entries are dL/dQ.

Feature f of a factor i (c = b * 2^i, h = b / 2) sits in block j = (f // c) * 2^i + (f % c // h) % 2^i
at in-block index (f % c) // (c / 2) * h + f % h: the (q, p, r) view of `butterfly.py`.

Launches: forward = chunk_matrix_kernel + rotate_kernel; backward = chunk_matrix_kernel +
rotate_backward_kernel + blocks_grad_kernel (the first and last touch only d x G numbers).
"""

import torch
import triton
import triton.language as tl

ORDER_BITS = 3  # factor indices are packed 3 bits each into one constexpr int (m <= 8); kernels spell it 3


@triton.jit
def _factor_offsets(rows_f, cols_f, FI: tl.constexpr, B: tl.constexpr, N_BLOCKS, TRANSPOSE: tl.constexpr):
    """Where F_i[rows_f, cols_f] lives in `blocks` (m, d/b, b, b), and which entries are in one block.

    rows_f (R,), cols_f (K,): global feature indices. Returns (offsets (R, K), same_block (R, K)).
    TRANSPOSE reads Q^T (x B_i^T) instead of Q (x B_i).
    """
    HALF = B // 2
    PAIRS = 1 << FI  # blocks per chunk of factor FI
    CHUNK = B * PAIRS
    wr = rows_f % CHUNK
    wc = cols_f % CHUNK
    block_r = (rows_f // CHUNK) * PAIRS + (wr // HALF) % PAIRS  # (R,)
    block_c = (cols_f // CHUNK) * PAIRS + (wc // HALF) % PAIRS  # (K,)
    in_r = (wr // (CHUNK // 2)) * HALF + wr % HALF  # index inside the block, (q, r) -> q * h + r
    in_c = (wc // (CHUNK // 2)) * HALF + wc % HALF
    same = block_r[:, None] == block_c[None, :]
    base = (FI * N_BLOCKS + block_r[:, None]) * (B * B)
    if TRANSPOSE:
        offs = base + in_c[None, :] * B + in_r[:, None]
    else:
        offs = base + in_r[:, None] * B + in_c[None, :]
    return offs, same


@triton.jit
def _factor_tile(blocks_ptr, rows_f, cols_f, FI: tl.constexpr, B: tl.constexpr, N_BLOCKS, TRANSPOSE: tl.constexpr):
    """Dense fp32 piece F_i[rows_f, cols_f] of factor FI (zeros outside its blocks)."""
    offs, same = _factor_offsets(rows_f, cols_f, FI, B, N_BLOCKS, TRANSPOSE)
    return tl.load(blocks_ptr + offs, mask=same, other=0.0)


@triton.jit
def chunk_matrix_kernel(
    blocks_ptr, m_ptr, N_BLOCKS,
    ORDER: tl.constexpr, L: tl.constexpr, B: tl.constexpr, G: tl.constexpr, BN: tl.constexpr,
    TRANSPOSE: tl.constexpr, PREC: tl.constexpr,
):
    """M_k[:, cols] = F_{o_0} ... F_{o_{L-1}}[:, cols] for chunk k = program 0, cols = block program 1.

    Grid (d/G, G/BN). Writes m_ptr (d/G, G, G) in its dtype. Right to left, so each program
    needs only BN columns of the last factor and G x G of the others.
    """
    k = tl.program_id(0)
    nb = tl.program_id(1)
    feats = k * G + tl.arange(0, G)  # (G,) rows of M_k, global features
    cols = k * G + nb * BN + tl.arange(0, BN)  # (BN,)
    LAST = (ORDER >> (3 * (L - 1))) & 7
    acc = _factor_tile(blocks_ptr, feats, cols, LAST, B, N_BLOCKS, TRANSPOSE)  # (G, BN)
    for jj in tl.static_range(1, L):
        fi = (ORDER >> (3 * (L - 1 - jj))) & 7
        f = _factor_tile(blocks_ptr, feats, feats, fi, B, N_BLOCKS, TRANSPOSE)  # (G, G)
        acc = tl.dot(f, acc, input_precision=PREC)
    rows_in = tl.arange(0, G)
    cols_in = nb * BN + tl.arange(0, BN)
    tl.store(m_ptr + k * G * G + rows_in[:, None] * G + cols_in[None, :], acc.to(m_ptr.dtype.element_ty))


@triton.jit
def rotate_kernel(
    x_ptr, m_ptr, y_ptr, rows, stride_x, stride_y,
    G: tl.constexpr, BT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """y[rows tile, chunk k] = x[tile, chunk k] @ M_k. Grid (cdiv(rows, BT), d/G).

    One read of x, one write of y; M_k (G x G) comes from L2.
    """
    t = tl.program_id(0)
    k = tl.program_id(1)
    r = t * BT + tl.arange(0, BT)  # (BT,)
    c = tl.arange(0, G)  # (G,)
    rmask = (r < rows)[:, None]
    r64 = r.to(tl.int64)[:, None]
    x = tl.load(x_ptr + r64 * stride_x + (k * G + c)[None, :], mask=rmask, other=0.0)  # (BT, G)
    mk = tl.load(m_ptr + k * G * G + c[:, None] * G + c[None, :])  # (G, G): M_k
    if UPCAST:  # the interpreter multiplies bf16 as raw bits; fp32 products of bf16 are exact anyway
        x = x.to(tl.float32)
        mk = mk.to(tl.float32)
    y = tl.dot(x, mk, input_precision=PREC)  # fp32 accumulate
    tl.store(y_ptr + r64 * stride_y + (k * G + c)[None, :], y.to(y_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def rotate_backward_kernel(
    x_ptr, g_ptr, m_ptr, gx_ptr, a_ptr, rows, tiles_per_prog, stride_x, stride_g, stride_gx,
    G: tl.constexpr, BT: tl.constexpr, NEED_A: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """grad_x = g @ M_k^T per tile, and (NEED_A) this program's partial A_k = sum x^T g.

    Grid (P, d/G): program p walks `tiles_per_prog` row tiles of chunk k and writes its
    partial A to a_ptr[p, k] (P, d/G, G, G) fp32; a later kernel sums the P partials.
    """
    p = tl.program_id(0)
    k = tl.program_id(1)
    c = tl.arange(0, G)
    feats = (k * G + c)[None, :]
    m_t = tl.load(m_ptr + k * G * G + c[None, :] * G + c[:, None])  # (G, G): M_k^T
    if UPCAST:
        m_t = m_t.to(tl.float32)
    acc_a = tl.full((G, G), 0.0, tl.float32)
    for i in range(tiles_per_prog):
        r = (p * tiles_per_prog + i) * BT + tl.arange(0, BT)  # (BT,)
        rmask = (r < rows)[:, None]
        r64 = r.to(tl.int64)[:, None]
        g = tl.load(g_ptr + r64 * stride_g + feats, mask=rmask, other=0.0)  # (BT, G)
        if UPCAST:
            g = g.to(tl.float32)
        gx = tl.dot(g, m_t, input_precision=PREC)
        tl.store(gx_ptr + r64 * stride_gx + feats, gx.to(gx_ptr.dtype.element_ty), mask=rmask)
        if NEED_A:
            x = tl.load(x_ptr + r64 * stride_x + feats, mask=rmask, other=0.0)  # (BT, G)
            if UPCAST:
                x = x.to(tl.float32)
            acc_a += tl.dot(tl.trans(x), g, input_precision=PREC)  # (G, G)
    if NEED_A:
        n_chunks = tl.num_programs(1)
        tl.store(a_ptr + (p * n_chunks + k) * G * G + c[:, None] * G + c[None, :], acc_a)


@triton.jit
def blocks_grad_kernel(
    a_ptr, blocks_ptr, gb_ptr, n_partials, N_BLOCKS,
    ORDER: tl.constexpr, L: tl.constexpr, B: tl.constexpr, G: tl.constexpr,
    TRANSPOSE: tl.constexpr, PREC: tl.constexpr,
):
    """dL/dQ of the active factor at position `idx` of the order, for chunk k. Grid (d/G, L).

    dF_j = (F_0 ... F_{j-1})^T A (F_{j+1} ... F_{L-1})^T with A = sum of the partials; only
    the entries inside factor o_j's blocks are stored (each belongs to exactly one chunk).
    """
    k = tl.program_id(0)
    idx = tl.program_id(1)
    n_chunks = tl.num_programs(0)
    c = tl.arange(0, G)
    feats = k * G + c
    a_offs = c[:, None] * G + c[None, :]
    acc = tl.full((G, G), 0.0, tl.float32)
    for p in range(n_partials):
        acc += tl.load(a_ptr + (p * n_chunks + k) * G * G + a_offs)
    for j in tl.static_range(L):  # left: F_{o_{idx-1}}^T ... F_{o_0}^T A
        fi = (ORDER >> (3 * j)) & 7
        if j < idx:
            f = _factor_tile(blocks_ptr, feats, feats, fi, B, N_BLOCKS, TRANSPOSE)
            acc = tl.dot(tl.trans(f), acc, input_precision=PREC)
    for jj in tl.static_range(L):  # right: ... F_{o_{L-1}}^T ... F_{o_{idx+1}}^T
        fj = (ORDER >> (3 * (L - 1 - jj))) & 7
        if L - 1 - jj > idx:
            f = _factor_tile(blocks_ptr, feats, feats, fj, B, N_BLOCKS, TRANSPOSE)
            acc = tl.dot(acc, tl.trans(f), input_precision=PREC)
    for j in tl.static_range(L):
        fs = (ORDER >> (3 * j)) & 7
        if j == idx:
            offs, same = _factor_offsets(feats, feats, fs, B, N_BLOCKS, TRANSPOSE)
            tl.store(gb_ptr + offs, acc, mask=same)


# ---------------------------------------------------------------- host side: plans and launches

MAX_CHUNK = 128  # widest G x G chunk matrix kept on chip (<= 128 MACs per element)
MAX_CHUNK_FP32 = 64  # fp32 tiles (three tf32 products) outgrow registers and shared memory beyond this

# (fp32, backward) -> (rows per tile BT, warps); picked from register/shared-memory reports for
# sm_90 (no spills) and GPU timings. TILE_OVERRIDE[(G, fp32, backward)] lets the benchmark try others.
_TILES = {
    (False, False): (64, 8), (False, True): (64, 8),  # 16-bit, G <= 64
    (True, False): (64, 8), (True, True): (32, 8),  # fp32, G <= 64
}
_TILES_WIDE = {False: (64, 8), True: (32, 8)}  # 16-bit, G = 128: forward, backward
TILE_OVERRIDE: dict = {}
BWD_PROGRAMS_PER_SM = 2  # backward programs per SM and chunk set: each keeps a G x G partial of x^T g


def tiles(width: int, fp32: bool, backward: bool) -> tuple[int, int]:
    """(BT, num_warps) for a pass over (BT x G) tiles."""
    key = (width, fp32, backward)
    if key in TILE_OVERRIDE:
        return TILE_OVERRIDE[key]
    return _TILES_WIDE[backward] if width > 64 else _TILES[(fp32, backward)]


def plan_problem(features: int, block_size: int, order, dtype=None) -> str | None:
    """Why the kernels cannot take this rotation, or None when they can."""
    if not order:
        return "no active factors"
    if max(order) >= 1 << ORDER_BITS:
        return f"factor index {max(order)} >= {1 << ORDER_BITS}"
    if block_size < 2 or block_size & (block_size - 1):
        return f"block size {block_size} is not a power of two >= 2"
    chunk = block_size << max(order)
    limit = MAX_CHUNK_FP32 if dtype == torch.float32 else MAX_CHUNK
    if chunk > limit:
        kind = "float32 " if dtype == torch.float32 else ""
        return f"{kind}chunk b*2^{max(order)} = {chunk} > {limit} features"
    if chunk_width(features, block_size, order) is None:
        return f"d={features} has no power-of-two tile >= 16 that is a multiple of the chunk {chunk}"
    return None


def chunk_width(features: int, block_size: int, order) -> int | None:
    """Tile width G: the chunk C = b * 2^top, widened to 64 features (or the widest power of two
    >= 16 dividing d) so tiles are tensor-core sized and rows are read in long runs."""
    chunk = block_size << max(order)
    if chunk >= 64:
        return chunk if features % chunk == 0 else None
    for width in (64, 32, 16):
        if width >= chunk and features % width == 0:
            return width
    return None


def _interpreted() -> bool:
    return type(rotate_kernel).__name__ == "InterpretedFunction"


def _pack_order(order) -> int:
    packed = 0
    for j, i in enumerate(order):
        packed |= int(i) << (ORDER_BITS * j)
    return packed


def _precision(device) -> str:
    """fp32 dots: three tf32 products on tensor cores (fp32-accurate); the interpreter is exact anyway."""
    return "ieee" if _interpreted() or device.type != "cuda" else "tf32x3"


def _upcast(dtype) -> bool:
    return _interpreted() and dtype == torch.bfloat16


def _rows(t, features: int):
    """(..., d) -> (rows, d) with unit feature stride (a view when possible)."""
    t2 = t.reshape(-1, features)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


_SM_COUNT: dict = {}


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 1  # interpreter: a couple of programs per chunk still exercises the partial sums
    key = device.index if device.index is not None else 0
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[key]


def chunk_matrices(blocks, order, transpose: bool, width: int, dtype):
    """M (d/G, G, G) in `dtype`: each G-chunk's product of the active factors, in order."""
    blocks = blocks.float().contiguous()  # the kernels index it densely (Cayley's solve returns it strided)
    m, n, b, _ = blocks.shape
    n_chunks = n * b // width
    out = torch.empty((n_chunks, width, width), dtype=dtype, device=blocks.device)
    bn = min(width, 32)
    chunk_matrix_kernel[(n_chunks, width // bn)](
        blocks, out, n,
        ORDER=_pack_order(order), L=len(order), B=b, G=width, BN=bn,
        TRANSPOSE=bool(transpose), PREC=_precision(blocks.device), num_warps=4 if width <= 64 else 8,
    )
    return out


def rotate(x, blocks, order, transpose: bool):
    """x R (or x R^T) for rows x (..., d); blocks (m, d/b, b, b) fp32 on x's device."""
    features = x.shape[-1]
    b = blocks.shape[-1]
    width = chunk_width(features, b, order)
    x2 = _rows(x, features)  # (rows, d)
    rows = x2.shape[0]
    y = torch.empty((rows, features), dtype=x.dtype, device=x.device)
    if rows:
        mk = chunk_matrices(blocks, order, transpose, width, x.dtype)  # (d/G, G, G)
        bt, warps = tiles(width, x.dtype == torch.float32, backward=False)
        rotate_kernel[(triton.cdiv(rows, bt), features // width)](
            x2, mk, y, rows, x2.stride(0), y.stride(0),
            G=width, BT=bt, PREC=_precision(x.device), UPCAST=_upcast(x.dtype), num_warps=warps,
        )
    return y.view(x.shape)


def rotate_backward(x, grad, blocks, order, transpose: bool, need_blocks_grad: bool):
    """(grad_x, grad_blocks or None) for y = x R (or x R^T): grad_x = grad R^T, grad_blocks fp32 (m, d/b, b, b)."""
    blocks = blocks.float().contiguous()
    features = x.shape[-1]
    m, n, b, _ = blocks.shape
    width = chunk_width(features, b, order)
    n_chunks = features // width
    x2 = _rows(x, features)
    g2 = _rows(grad.to(x.dtype), features)
    rows = x2.shape[0]
    grad_x = torch.empty((rows, features), dtype=x.dtype, device=x.device)
    grad_blocks = torch.zeros_like(blocks, dtype=torch.float32) if need_blocks_grad else None
    if not rows:
        return grad_x.view(x.shape), grad_blocks
    prec = _precision(x.device)
    mk = chunk_matrices(blocks, order, transpose, width, x.dtype)
    bt, warps = tiles(width, x.dtype == torch.float32, backward=True)
    n_tiles = triton.cdiv(rows, bt)
    if need_blocks_grad:  # few programs per chunk, each summing many tiles: few partials to add
        programs = max(1, min(n_tiles, triton.cdiv(BWD_PROGRAMS_PER_SM * _sm_count(x.device), n_chunks)))
        per_prog = triton.cdiv(n_tiles, programs)
        programs = triton.cdiv(n_tiles, per_prog)
        partials = torch.empty((programs, n_chunks, width, width), dtype=torch.float32, device=x.device)
    else:
        programs, per_prog, partials = n_tiles, 1, grad_x  # partials unused
    rotate_backward_kernel[(programs, n_chunks)](
        x2, g2, mk, grad_x, partials, rows, per_prog, x2.stride(0), g2.stride(0), grad_x.stride(0),
        G=width, BT=bt, NEED_A=need_blocks_grad, PREC=prec, UPCAST=_upcast(x.dtype), num_warps=warps,
    )
    if need_blocks_grad:
        blocks_grad_kernel[(n_chunks, len(order))](
            partials, blocks, grad_blocks, programs, n,
            ORDER=_pack_order(order), L=len(order), B=b, G=width, TRANSPOSE=bool(transpose), PREC=prec,
            num_warps=4 if width < 64 else 8,
        )
    return grad_x.view(x.shape), grad_blocks
