"""The compiled loops of :mod:`mergelib.kernels` (imported only when a kernel runs: it imports Numba).

Each loop makes the float32 operations of the torch code it replaces, in the same order, for every
entry; see :mod:`mergelib.kernels` for what each one replaces and the tests that check the bits. The
functions live at module level so that Numba's disk cache (``cache=True``) finds them again in the next
process instead of compiling them anew.
"""
import numba
import numpy as np
from llvmlite import ir
from llvmlite.binding import llvm_version_info
from numba.core import types
from numba.extending import intrinsic, overload

jit = numba.njit(cache=True, nogil=True, boundscheck=False)
inline = numba.njit(inline="always")  # a helper of the loops, inlined into them by Numba (not a call)
zero32 = np.float32(0.0)
one32 = np.float32(1.0)
inf32 = np.float32(np.inf)


@intrinsic
def fma(typingctx, a, b, c):
    """``fma(a, b, c)``: float32 ``a * b + c`` rounded once (LLVM's ``llvm.fma``), compiled inline."""
    if not all(t == types.float32 for t in (a, b, c)):
        return None

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        f = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(f, args)
    return types.float32(types.float32, types.float32, types.float32), codegen


@intrinsic
def widen(typingctx, x):
    """An entry as float32: a float32 as it is; a bfloat16, read as its uint16 bits, as the float32 with
    those 16 high bits and 16 zero bits (exactly ``Tensor.float()`` of a bf16 tensor)."""
    if x == types.float32:
        def codegen(context, builder, signature, args):
            return args[0]
    elif x == types.uint16:
        def codegen(context, builder, signature, args):
            bits = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(bits, ir.FloatType())
    else:
        return None
    return types.float32(x), codegen


# The float32 constants are np.float32: a Python float literal would promote the arithmetic to
# float64 and change the bits. The loops run over entries j on the outside, so that the compiler
# vectorises them; the few task values of an entry stay in registers. Inputs are float32 arrays or bf16
# tensors' bits as uint16 arrays (widen); the arithmetic is float32 either way, as in the torch code.


@jit
def sum_task_vectors(out, fts, base, scale, final):
    # acc = ((0 + (f_0[j] - b[j])) + (f_1[j] - b[j])) + ...: the adds of acc.zero_(); acc.add_(t_i).
    # out[j] = acc, or with final, fma(acc, scale, b[j]): torch.add(b, acc, alpha=scale) on a CPU whose
    # kernels fuse it (kernels.fused_add_matches_torch). Returns the number of non-finite sums
    # (|NaN| < inf is false). final is the same for every j: the compiler takes the branch out of the loop
    bad = 0
    for j in range(out.shape[0]):
        b = widen(base[j])
        acc = zero32
        for f in fts:
            acc += widen(f[j]) - b
        out[j] = fma(acc, scale, b) if final else acc
        bad += not abs(acc) < inf32
    return bad


@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath={"reassoc"})
def copy_l1_norm(out, x):
    # out[j] = x[j] and sum |x_j| in float64, reassociated (vectorised, in an order the compiler picks): a
    # float64 sum of float32 values, exact to ~1e-16 relative, so that its float32 rounding does not
    # depend on the order
    acc = 0.0
    for j in range(x.shape[0]):
        v = x[j]
        out[j] = v
        acc += abs(np.float64(v))
    return acc


@jit
def weighted_row_sum(out, rows, weights):
    # acc = ((0 + r_0[j] * w_0) + r_1[j] * w_1) + ...: the float operations of rows.mul_(w[:, None]), then
    # acc.zero_() and acc.add_(row) for each row (each product rounded, then each sum)
    for j in range(out.shape[0]):
        acc = zero32
        for i in range(len(rows)):
            acc += rows[i][j] * weights[i]
        out[j] = acc


@inline
def trimmed(x, thr):
    # TIES's official trim of one entry: x * (|x| >= thr) as a 0/1 float mask (x * 0 = +-0)
    return x * (one32 if abs(x) >= thr else zero32)


@inline
def relu(a):
    # clamp_min(a, 0): keeps a NaN (NaN < 0 is false), so a non-finite input reaches the result
    return zero32 if a < zero32 else a


@inline
def trimmed_sum(fts, j, b, thr):
    # tot = (0 + t_0) + t_1 + ... with t_i = trimmed(f_i[j] - b, thr_i)
    tot = zero32
    for i in range(len(fts)):
        tot += trimmed(widen(fts[i][j]) - b, thr[i])
    return tot


@inline
def disjoint_mean(fts, j, b, thr, s):
    # ((0 + relu(t_0 s)) + relu(t_1 s) + ...) * s / max(#(t_i s > 0), 1): the entries that agree with the
    # sign s, averaged (s = +1: t * 1 = t exactly, so the positive entries' mean num / max(cnt, 1));
    # returns that mean and cnt, the number of entries that agree (as a float32)
    num = zero32
    cnt = zero32
    for i in range(len(fts)):
        a = trimmed(widen(fts[i][j]) - b, thr[i]) * s
        if a > zero32:
            cnt += one32
        num += relu(a)
    return (num * s) / (cnt if cnt > one32 else one32), cnt


@inline
def elected(tot):
    # s = +1 if tot > 0 else -1, and this entry's majority-sign vote (+1, -1, or 0 where tot == 0)
    if tot > zero32:
        return one32, 1
    return -one32, -1 if tot < zero32 else 0


# TIES per entry j, with x_i = f_i[j] - b[j]: t_i = trimmed(x_i, thr_i), tot = trimmed_sum, s = elected(tot),
# out = disjoint_mean(s), or with final fma(out, scale, b[j]) (as sum_task_vectors). The sweeps return
# #(tot > 0) - #(tot < 0) (the majority-sign votes), the number of non-finite results (a NaN or inf
# input makes its column's result NaN or inf) and the number of marked entries: zero[j] marks the
# entries whose bits a positive majority sign may change, which then take ties_majority_positive's value.
#
# Which entries: tot == 0 elects s = -1, and a positive majority s = +1. If some trimmed entries are
# negative (cnt > 0 for s = -1), a zero sum has positive ones too: the entries cancel, and the means
# differ. Otherwise every trimmed entry is +-0 and both means are 0, -0.0 for s = -1 and +0.0 for s = +1:
# the written value is the same unless that sign shows, i.e. the value is written as it is (not final)
# or added to a base of +-0 (fma(-0.0, scale, -0.0) = -0.0, fma(+0.0, scale, -0.0) = +0.0; any other
# base is unchanged by +-0). Only those entries are marked: in a TIES merge at density 0.2 about 40 % of
# the columns sum to 0 (all their entries trimmed), and only a few of them cancel.


@jit
def ties_sweep(out, zero, fts, base, thr, scale, final):
    votes = 0
    bad = 0
    marked = 0
    for j in range(out.shape[0]):
        b = widen(base[j])
        tot = trimmed_sum(fts, j, b, thr)
        s, vote = elected(tot)
        votes += vote
        v, agree = disjoint_mean(fts, j, b, thr, s)
        mark = (tot == zero32) & ((agree > zero32) | (b == zero32) | (not final))
        zero[j] = mark
        marked += mark
        out[j] = fma(v, scale, b) if final else v
        bad += not abs(v) < inf32
    return votes, bad, marked


@jit
def ties_majority_positive(out, zero, fts, base, thr, scale, final):
    # where zero[j] (ties_sweep's marks) and the majority sign is +: the mean of the positive trimmed
    # entries (+0.0 if none); with final, fma(mean, scale, b[j])
    for j in range(out.shape[0]):
        if zero[j]:
            b = widen(base[j])
            v, _ = disjoint_mean(fts, j, b, thr, one32)
            out[j] = fma(v, scale, b) if final else v


# The exact trim (trim_rule="exact") keeps exactly `keep` entries of each row of a trim segment (a tensor,
# or the whole model for the global trim): every |x| > thr_i, and of the ties |x| == thr_i the first
# need_i = keep - #(|x| > thr_i) in flat order (the torch code's running count, competition._trim_into).
# Keeping a tie or not is the official trim with one of two thresholds: |x| >= thr_i keeps the ties,
# |x| >= thr_next_i (the next float32 above thr_i) drops them (|x| > thr_i for every |x| but NaN, which
# neither keeps). Row i keeps the ties at flat positions g <= cut_i of the segment: cut_i is the position
# of its need_i-th tie (ExactTrim.NO_CUT while the budget lasts). take_ties finds it, tensor by tensor;
# the tensor is then swept by ties_sweep in parts, split after each cut inside it (at most N + 1 parts),
# each part with the thresholds that keep or drop every row's ties there (kernels.ExactTrim).

TIE_BLOCK = 4096  # entries per block of take_ties' vectorised count


@jit
def take_ties(f, base, t, taken, need):
    # one row's ties |f[j] - base[j]| == t in a tensor, taken up to need: (ties taken after the tensor, the
    # position of the need-th if the budget runs out in it, else -1). Counted block by block (vectorised:
    # each block is a slice, a loop from 0, which the compiler vectorises where a nested range(b0, b1)
    # ran 7x slower); the block where the budget runs out is scanned for the position
    m = f.shape[0]
    for b0 in range(0, m, TIE_BLOCK):
        fb, bb = f[b0:b0 + TIE_BLOCK], base[b0:b0 + TIE_BLOCK]
        c = 0
        for j in range(fb.shape[0]):
            c += abs(widen(fb[j]) - widen(bb[j])) == t
        if taken + c < need:
            taken += c
            continue
        for j in range(fb.shape[0]):
            if abs(widen(fb[j]) - widen(bb[j])) == t:
                taken += 1
                if taken == need:
                    return taken, b0 + j
    return taken, -1


@jit
def ties_majority_positive_exact(out, zero, fts, base, thr, thr_next, cut, offset, positions, scale, final):
    # ties_majority_positive for the exact trim: entry j is at flat position offset + j of its segment, or
    # positions[j] where given (entries gathered from a tensor)
    eff = np.empty(len(fts), dtype=np.float32)
    gathered = positions.shape[0] > 0
    for j in range(out.shape[0]):
        if zero[j]:
            g = positions[j] if gathered else offset + j
            for i in range(len(fts)):
                eff[i] = thr[i] if g <= cut[i] else thr_next[i]
            b = widen(base[j])
            v, _ = disjoint_mean(fts, j, b, eff, one32)
            out[j] = fma(v, scale, b) if final else v


# The counting pass of mergelib.selection's exact order statistics orders the values value(f, base, j):
# |f[j] - base[j]| (task vectors from the state dicts), |f[j] - base| for a float32 base (0: |f[j]|, a row's
# magnitudes) or, with base None, f[j] itself (a signed row). A bracket open on one side has lo = -inf or
# hi = inf (a NaN is then in no bracket: |NaN| < lo, >= lo and <= hi are all false).
def value(f, base, j):
    """The value the counting loops order (compiled: :func:`_value`)."""
    raise NotImplementedError("compiled only")


@overload(value, inline="always")
def _value(f, base, j):
    if isinstance(base, types.NoneType):
        return lambda f, base, j: widen(f[j])
    if isinstance(base, types.Float):
        return lambda f, base, j: abs(widen(f[j]) - base)
    return lambda f, base, j: abs(widen(f[j]) - widen(base[j]))


def tied(c, tie):
    """``c == tie``; False where there is no tied value (``tie`` None) (compiled: :func:`_tied`)."""
    raise NotImplementedError("compiled only")


@overload(tied, inline="always")
def _tied(c, tie):
    if isinstance(tie, types.NoneType):
        return lambda c, tie: False
    return lambda c, tie: c == tie


# The counting pass stores each bracket's candidates 16 entries at a time with AVX-512's compress store
# (LLVM's llvm.masked.compressstore: the entries of a vector where a mask holds, written one after the
# other; for a CPU without it LLVM writes them lane by lane, with the same result): 0.16-0.21 ns per entry
# on the course's CPU at any share of candidates, where the branch-free scalar store (each entry written
# at the end of the candidates, which move on only past a kept one) took 0.8-1.3 ns. Compiled for other
# CPUs on the same machine (NUMBA_CPU_NAME; the tests pass for both): AVX2 (haswell) 0.21 ns, the x86-64
# baseline (generic, SSE2) 0.46-0.76 ns.
#
# On AMD Zen 4 (the course's CPU since 2026-12-04) the compress store to memory is microcoded: 1.3 ns per
# entry even when no lane is kept (measured by the counting pass's loop on 4M entries), which made the
# counting pass, and with it TIES's global trim and PCB's clip values, 6-8x slower. So the loop packs the
# kept lanes in a register (llvm.experimental.vector.compress, LLVM 19 and later; vcompressps to a register
# is fast on every AVX-512 CPU) and stores all 16 lanes, the unkept ones past the candidates, where the
# next store writes: 0.13-0.14 ns per entry with up to 5 % of the entries kept, 0.22 ns at 50 % (storing
# only when a lane is kept cost 0.52 ns at 5 %: the branch is then unpredictable). Older LLVMs keep the
# compress store, behind that branch (1.3 ns when taken on Zen 4, 0.15 ns when not).
LANES = 16
_REGISTER_COMPRESS = llvm_version_info >= (19,)
_I16, _I64 = ir.IntType(16), ir.IntType(64)
HALF = LANES // 2
_I32, _VI64, _VI32h = ir.IntType(32), ir.VectorType(_I64, HALF), ir.VectorType(ir.IntType(32), HALF)
_VF, _VI16, _VI32, _VB = (ir.VectorType(ir.FloatType(), LANES), ir.VectorType(ir.IntType(16), LANES),
                          ir.VectorType(ir.IntType(32), LANES), ir.VectorType(ir.IntType(1), LANES))


def _declare(builder, name, ret, args):
    fn = builder.module.globals.get(name)
    return fn if fn is not None else ir.Function(builder.module, ir.FunctionType(ret, args), name=name)


def _splat(builder, x):
    v = builder.insert_element(ir.Constant(_VF, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, ir.Constant(_VF, ir.Undefined), ir.Constant(_VI32, [0] * LANES))


def _load16(context, builder, ty, arr, j):
    """Entries j..j+15 of a contiguous float32 array, or of a bf16 tensor's bits (uint16), as 16 float32
    (widened as :func:`widen` does)."""
    data = context.make_array(ty)(context, builder, arr).data
    at = builder.gep(data, [j])
    if ty.dtype == types.float32:
        return builder.load(builder.bitcast(at, _VF.as_pointer()), align=4)
    bits = builder.zext(builder.load(builder.bitcast(at, _VI16.as_pointer()), align=2), _VI32)
    return builder.bitcast(builder.shl(bits, ir.Constant(_VI32, [16] * LANES)), _VF)


def _popcount(builder, mask):
    return builder.zext(builder.call(_declare(builder, "llvm.ctpop.i16", _I16, [_I16]), [builder.bitcast(mask, _I16)]),
                        _I64)


def _popcount8(builder, mask):
    return builder.zext(builder.call(_declare(builder, "llvm.ctpop.i8", ir.IntType(8), [ir.IntType(8)]),
                                     [builder.bitcast(mask, ir.IntType(8))]), _I64)


def _store_packed(builder, vec, mask, at, kept):
    """The lanes of ``vec`` (16 float32 or 8 int64) where ``mask`` holds, one after the other, at ``at``
    (``kept``: how many): packed in a register and every lane stored, the unkept ones past the kept (room
    for all lanes at ``at``), or with LLVM < 19 by its compress store, only where a lane is kept (see
    ``_REGISTER_COMPRESS``)."""
    vty, mty = vec.type, mask.type
    floats = isinstance(vty.element, ir.FloatType)
    name = f"v{vty.count}{'f32' if floats else 'i64'}"
    if _REGISTER_COMPRESS:
        compress = _declare(builder, f"llvm.experimental.vector.compress.{name}", vty, [vty, mty, vty])
        builder.store(builder.call(compress, [vec, mask, ir.Constant(vty, ir.Undefined)]),
                      builder.bitcast(at, vty.as_pointer()), align=4 if floats else 8)
    else:
        store = _declare(builder, f"llvm.masked.compressstore.{name}", ir.VoidType(),
                         [vty, vty.element.as_pointer(), mty])
        with builder.if_then(builder.icmp_unsigned("!=", kept, ir.Constant(_I64, 0)), likely=False):
            builder.call(store, [vec, at, mask])


@intrinsic
def compress16(typingctx, f, base, lo, hi, tie, store, k, j):
    """Entries j..j+15 of the counting pass: with c = value(f, base, .), stores the c in [lo, hi] (and not
    equal to ``tie`` where one is given) at store[k], store[k + 1], ... in order; returns (k after them,
    #(c < lo), #(c == tie)). f, base (an array) and store contiguous; a NaN is in no bracket."""
    contiguous = lambda a, dtypes: (isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"  # noqa: E731
                                    and a.dtype in dtypes)
    if not (contiguous(f, (types.float32, types.uint16)) and contiguous(store, (types.float32,))
            and (isinstance(base, types.NoneType) or base == types.float32 or base == f)
            and lo == hi == types.float32 and (isinstance(tie, types.NoneType) or tie == types.float32)):
        return None

    def codegen(context, builder, signature, args):
        fa, ba, lo_v, hi_v, tie_v, sa, kv, jv = args
        fty, bty, _, _, tty, sty, _, _ = signature.args
        c = _load16(context, builder, fty, fa, jv)
        if isinstance(bty, types.Array):
            c = builder.fsub(c, _load16(context, builder, bty, ba, jv))
        elif bty == types.float32:
            c = builder.fsub(c, _splat(builder, ba))
        if not isinstance(bty, types.NoneType):
            c = builder.call(_declare(builder, "llvm.fabs.v16f32", _VF, [_VF]), [c])
        lo_s, hi_s = _splat(builder, lo_v), _splat(builder, hi_v)
        below = builder.fcmp_ordered("<", c, lo_s)
        keep = builder.and_(builder.fcmp_ordered(">=", c, lo_s), builder.fcmp_ordered("<=", c, hi_s))
        points = ir.Constant(_I64, 0)
        if not isinstance(tty, types.NoneType):
            eq = builder.fcmp_ordered("==", c, _splat(builder, tie_v))
            points = _popcount(builder, eq)
            keep = builder.and_(keep, builder.not_(eq))
        data = context.make_array(sty)(context, builder, sa).data
        kept = _popcount(builder, keep)
        _store_packed(builder, c, keep, builder.gep(data, [kv]), kept)  # the store has room for all 16
        return context.make_tuple(builder, signature.return_type,
                                  [builder.add(kv, kept), _popcount(builder, below), points])
    return types.UniTuple(types.int64, 3)(f, base, lo, hi, tie, store, k, j), codegen


@jit
def count_bracket(f, base, lo, hi, tie, store):
    # the counting pass for a bracket lo < hi: returns (#(c < lo), #(c == tie), k) with the k entries c in
    # [lo, hi] in store[:k] in order, c = value(f, base, j); a tied value (tie not None) is counted, not
    # kept. 16 entries at a time (compress16), the last few one by one; store holds at least len(f) entries
    below, points, k = 0, 0, 0
    m = f.shape[0]
    j = 0
    while j + LANES <= m:
        k, b, p = compress16(f, base, lo, hi, tie, store, k, j)
        below += b
        points += p
        j += LANES
    for j in range(j, m):
        c = value(f, base, j)
        below += c < lo
        eq = tied(c, tie)
        points += eq
        store[k] = c
        k += (c >= lo) & (c <= hi) & (not eq)
    return below, points, k


@jit
def count_point(f, base, v):
    # a bracket on one value v (lo == hi == tie): (#(c < v), #(c == v)), nothing kept (no store, so the loop
    # vectorises)
    below, points = 0, 0
    for j in range(f.shape[0]):
        c = value(f, base, j)
        below += c < v
        points += c == v
    return below, points


# PCB-Merging, official code (competition._pcb_official), entry j of a tensor with x_i = f_i[j] - b[j]: row
# i's clip values lo_i <= hi_i (the order statistics of |tau_i|), span_i = hi_i - lo_i (inf where 0:
# competition._safe_den). tanh and exp stay torch's (their bits are ATen's vectorised implementations): the
# loops compute their arguments and use their results.

TANH_IDENTITY_BELOW = np.float32(2.0 ** -12)  # competition.TANH_IDENTITY_BELOW: tanh(x) == x below it


@inline
def clipped(x, lo, hi):
    # min(max(|x|, lo), hi) (competition._clamp_abs; a NaN stays NaN)
    a = abs(x)
    a = lo if a < lo else a
    return hi if a > hi else a


# The loops run over the tasks within blocks of PCB_BLOCK entries (the block's sums stay in cache between
# tasks), so that each inner loop reads and writes a few arrays: with every task's arrays in one loop, the
# compiler's runtime checks that the outputs overlap no input exceed its budget, and it does not vectorise
# (6 ns per entry against 0.5). The tasks still add in order for every entry.
PCB_BLOCK = 4096


@intrinsic
def bits_as_float(typingctx, i):
    """The float32 whose bit pattern is the int32 ``i`` (a register's reinterpretation, compiled inline)."""
    if i != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


LOG2E = np.float32(1.4426950408889634)
LN2 = np.float32(0.6931471805599453)
EXP_TAYLOR = tuple(np.float32(1 / c) for c in (2, 6, 24, 120))
# exp(z) = 2**k * exp(u), k = int(z / ln 2), u = (z / ln 2 - k) * ln 2 in [0, ln 2): the Taylor polynomial of
# degree 5 is below exp(u) by at most u**6 / 720 * exp(u) < 3e-4 of it; float32's roundings add a few 1e-7
# (times k); torch's exp is within an ulp (1.2e-7) of exp, and the score's product rounds by 6e-8.
# 1 + 2**-9 (2.0e-3) covers all of it: the bound is 1.0018-1.0020 times exp(z) (tests/test_kernels.py)
EXP_BOUND_MARGIN = np.float32(1 + 2.0 ** -9)
# z = N * minmax**2 lies in [0, N], and kernels.ScoreCandidates.BOUNDED_TASKS (80) caps N: 2**k stays a normal
# float32 (k <= 126) for z up to 87


@inline
def score_bound(z, p):
    # an upper bound of the score beta = exp(z) * tanh(p) for z in [0, 80] (kernels.ScoreCandidates.BOUNDED_TASKS):
    # max(p, 0) * exp(z) bounded from above (tanh(p) <= p for p >= 0, and is p where |p| < 2**-12; beta <= 0
    # where p <= 0), vectorised: no table, 2**k from its exponent bits
    y = z * LOG2E
    k = np.int32(y)
    u = (y - np.float32(k)) * LN2
    e = one32 + u * (one32 + u * (EXP_TAYLOR[0] + u * (EXP_TAYLOR[1] + u * (EXP_TAYLOR[2] + u * EXP_TAYLOR[3]))))
    two_k = bits_as_float(np.int32((k + np.int32(127)) << np.int32(23)))
    return max(p, zero32) * (e * two_k * EXP_BOUND_MARGIN)


@jit
def pcb_bound_rows(zs, ps, ubs):
    # score_bound of every entry of N x C blocks (a test's view of the bound pcb_scores writes)
    for i in range(zs.shape[0]):
        z, p, ub = zs[i], ps[i], ubs[i]
        for j in range(z.shape[0]):
            ub[j] = score_bound(z[j], p[j])


@jit
def pcb_scores(zs, ps, col, fts, base, lo, hi, span, nf, ubs):
    # steps 1-3 up to exp and tanh (competition._pcb_official_row), per entry j of a tensor: z_i[j] =
    # ((clipped(x_i) - lo_i) / span_i) ** 2 * N (intra = exp(z)) and p_i[j] = x_i * tot (inter = tanh(p)) with
    # tot = ((0 + x_0) + x_1) + ... (competition._row_sum). Returns #(non-finite tot) (0 iff every x is finite)
    # and #(not |p| < 2**-12): the entries whose tanh may differ from p. zs, ps: N x C blocks, the tensor's
    # entries at their columns col.. (No float sums over j: a float reduction keeps the compiler from
    # vectorising the loop.) ubs: None, or an N x C block for score_bound(z, p), an upper bound of exp(z) * tanh(p)
    bad = 0
    big = 0
    tot = np.empty(PCB_BLOCK, dtype=np.float32)
    for b0 in range(0, base.shape[0], PCB_BLOCK):
        bb = base[b0:b0 + PCB_BLOCK]
        tb = tot[:bb.shape[0]]
        tb[:] = zero32
        for f in fts:
            fb = f[b0:b0 + PCB_BLOCK]
            for j in range(bb.shape[0]):
                tb[j] += widen(fb[j]) - widen(bb[j])
        for j in range(bb.shape[0]):
            bad += not abs(tb[j]) < inf32
        for i in range(len(fts)):
            a0 = col + b0
            fb, zb, pb = fts[i][b0:b0 + PCB_BLOCK], zs[i, a0:a0 + PCB_BLOCK], ps[i, a0:a0 + PCB_BLOCK]
            lo_i, hi_i, span_i = lo[i], hi[i], span[i]
            for j in range(bb.shape[0]):
                x = widen(fb[j]) - widen(bb[j])
                d = (clipped(x, lo_i, hi_i) - lo_i) / span_i
                zb[j] = (d * d) * nf
                v = x * tb[j]
                pb[j] = v
                big += not abs(v) < TANH_IDENTITY_BELOW
            if ubs is not None:  # (Numba compiles this out where ubs is None)
                ub = ubs[i, a0:a0 + PCB_BLOCK]
                for j in range(bb.shape[0]):  # the block's z and p, still in the L1 cache
                    ub[j] = score_bound(zb[j], pb[j])
    return bad, big


@jit
def blocks_reaching(x, t, width, flags):
    # flags[b]: whether x[b * width:(b + 1) * width] holds an entry with not |x| < t (NaN included): the blocks
    # where competition._tanh_ applies tanh (a vectorised count per block). Returns the number flagged
    flagged = 0
    for b in range(flags.shape[0]):
        xb = x[b * width:(b + 1) * width]
        c = 0
        for j in range(xb.shape[0]):
            c += not abs(xb[j]) < t
        flags[b] = c > 0
        flagged += c > 0
    return flagged


@jit
def pcb_weighted_sum(num, den, betas, bcol, fts, base, lo, hi, q, span, lam, scaled):
    # steps 5-6 (competition._pcb_official_add with competition._pcb_official_tprime's tau'): with
    # s_i = (max(beta_i[j], q_i) - q_i) / span_i (span_i = max_i - q_i, inf where 0) and
    # t_i = sign(x_i) * clipped(x_i) (* lam_i where scaled), num[j] = ((num[j] + t_0 s_0) + t_1 s_1) + ... and
    # den[j] = ((den[j] + s_0) + s_1) + ... (sign(0) * a = +0, as 0 here: the sums start at +0, so the sign of
    # a zero term never shows). betas: an N x C block, the tensor's scores at its columns bcol..
    for b0 in range(0, base.shape[0], PCB_BLOCK):
        bb, nb, db = base[b0:b0 + PCB_BLOCK], num[b0:b0 + PCB_BLOCK], den[b0:b0 + PCB_BLOCK]
        for i in range(len(fts)):
            fb, be = fts[i][b0:b0 + PCB_BLOCK], betas[i, bcol + b0:bcol + b0 + PCB_BLOCK]
            lo_i, hi_i, q_i, span_i, lam_i = lo[i], hi[i], q[i], span[i], lam[i]
            for j in range(bb.shape[0]):
                x = widen(fb[j]) - widen(bb[j])
                a = clipped(x, lo_i, hi_i)
                t = a if x > zero32 else (-a if x < zero32 else zero32)
                if scaled:
                    t = t * lam_i
                bt = be[j]
                s = ((q_i if bt < q_i else bt) - q_i) / span_i
                nb[j] += t * s
                db[j] += s


# PCB's drop threshold q_i is an order statistic of row i's balancing scores beta at rank 1 - r: at the
# official r = 0.05, 95 % of a row's entries lie at or below it and take no part in the weighted sums (their
# weight s_i is +0, and adding t * (+0) = +-0 to a sum that is never -0 changes no bit). So the merge keeps,
# of each row, only the entries above a floor below q_i (a sample's bracket, as the counting pass's),
# with their positions, and counts the others (competition._pcb_official_sparse): no N x D beta.


@intrinsic
def keep_above16(typingctx, b, floor, vals, poss, k, j, col):
    """Entries j..j+15 of the float32 row ``b``: stores those > floor at vals[k], vals[k + 1], ... in order
    and their positions col + j + lane at poss[k], ...; returns (k after them, #(< floor), #(== floor)).
    vals and poss have room for 16 entries at k (all 16 lanes are stored where LLVM packs in a register)."""
    row = lambda a, dt: isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype == dt  # noqa: E731
    if not (row(b, types.float32) and row(vals, types.float32) and row(poss, types.int64)
            and floor == types.float32):
        return None

    def codegen(context, builder, signature, args):
        ba, fl, va, pa, kv, jv, cv = args
        bty, _, vty, pty = signature.args[:4]
        v = _load16(context, builder, bty, ba, jv)
        fl_s = _splat(builder, fl)
        above = builder.fcmp_ordered(">", v, fl_s)
        below = builder.fcmp_ordered("<", v, fl_s)
        at = builder.fcmp_ordered("==", v, fl_s)
        # the positions in two halves of 8 int64 (LLVM 22 crashes compressing 16 int64 in a register)
        first = builder.insert_element(ir.Constant(_VI64, ir.Undefined), builder.add(cv, jv), ir.Constant(_I32, 0))
        first = builder.shuffle_vector(first, ir.Constant(_VI64, ir.Undefined), ir.Constant(_VI32h, [0] * HALF))
        vdata = builder.gep(context.make_array(vty)(context, builder, va).data, [kv])
        pdata = context.make_array(pty)(context, builder, pa).data
        halves = []
        for h in range(2):
            mask = builder.shuffle_vector(above, ir.Constant(_VB, ir.Undefined),
                                          ir.Constant(_VI32h, list(range(h * HALF, (h + 1) * HALF))))
            halves.append((mask, builder.add(first, ir.Constant(_VI64, list(range(h * HALF, (h + 1) * HALF))))))
        kept_lo = _popcount8(builder, halves[0][0])
        kept = _popcount(builder, above)
        _store_packed(builder, v, above, vdata, kept)
        _store_packed(builder, halves[0][1], halves[0][0], builder.gep(pdata, [kv]), kept_lo)
        _store_packed(builder, halves[1][1], halves[1][0], builder.gep(pdata, [builder.add(kv, kept_lo)]),
                      builder.sub(kept, kept_lo))
        return context.make_tuple(builder, signature.return_type,
                                  [builder.add(kv, kept), _popcount(builder, below), _popcount(builder, at)])
    return types.UniTuple(types.int64, 3)(b, floor, vals, poss, k, j, col), codegen


@jit
def pcb_keep_above(betas, floors, col, vals, poss, ks, below, at):
    # for each row i of the N x w block betas (columns col.. of the model): the entries > floors[i] appended
    # to vals[i] and their positions to poss[i] from ks[i] on (ks advanced), #(< floor) added to below[i] and
    # #(== floor) to at[i]. vals[i], poss[i] have room for w + 16 entries after ks[i]
    for i in range(betas.shape[0]):
        b, fl, v_i, p_i = betas[i], floors[i], vals[i], poss[i]
        k, lo, eq = ks[i], 0, 0
        m = b.shape[0]
        j = 0
        while j + LANES <= m:
            k, nl, ne = keep_above16(b, fl, v_i, p_i, k, j, col)
            lo += nl
            eq += ne
            j += LANES
        for j in range(j, m):
            x = b[j]
            v_i[k] = x
            p_i[k] = col + j
            k += x > fl
            lo += x < fl
            eq += x == fl
        ks[i] = k
        below[i] += lo
        at[i] += eq


@jit
def pcb_gather_candidates(zs, ps, cposs, counts, offsets, cz, cp, bigs):
    # the candidates' exp and tanh arguments, row after row: cz[offsets[i] + e] = zs[i, cposs[i, e]] for e
    # below counts[i], and the same for p, with offsets[i] the candidates of the rows before i; bigs: the
    # packed positions of the candidates whose tanh may differ from p (not |p| < 2**-12, NaN included).
    # Returns (the number of candidates, the number of bigs). cz, cp, bigs have room for every entry of zs
    o = 0
    nb = 0
    for i in range(zs.shape[0]):
        offsets[i] = o
        z, p, c = zs[i], ps[i], cposs[i]
        for e in range(counts[i]):
            v = p[c[e]]
            cz[o + e] = z[c[e]]
            cp[o + e] = v
            bigs[nb] = o + e
            nb += not abs(v) < TANH_IDENTITY_BELOW
        o += counts[i]
    return o, nb


@jit
def pcb_keep_candidates(betas, offsets, counts, cposs, floors, col, vals, poss, ks, below, at, maxima):
    # pcb_keep_above for the candidates' exact scores betas[offsets[i]:offsets[i] + counts[i]] of row i, at
    # block columns cposs[i, :counts[i]] (ascending): those > floors[i] appended with their model columns
    # col + cposs, the others counted; maxima[i] raised to the row's largest score
    for i in range(floors.shape[0]):
        fl, o, c, v_i, p_i = floors[i], offsets[i], cposs[i], vals[i], poss[i]
        k, lo, eq, mx = ks[i], 0, 0, maxima[i]
        for e in range(counts[i]):
            x = betas[o + e]
            v_i[k] = x
            p_i[k] = col + c[e]
            k += x > fl
            lo += x < fl
            eq += x == fl
            mx = x if x > mx else mx
        ks[i] = k
        below[i] += lo
        at[i] += eq
        maxima[i] = mx


@jit
def pcb_scatter_candidates(block, betas, offsets, counts, cposs, fill):
    # row i of the N x w block filled with fill[i], then the candidates' scores betas[offsets[i] + e] written at
    # their block columns cposs[i, e], e below counts[i] (pcb_gather_candidates' layout)
    for i in range(block.shape[0]):
        b, o, c = block[i], offsets[i], cposs[i]
        b[:] = fill[i]
        for e in range(counts[i]):
            b[c[e]] = betas[o + e]


@jit
def pcb_scatter_kept(block, vals, poss, starts, ends, c0, fill):
    # the scores of model columns c0.. c0 + w as pcb_weighted_sum reads them: row i of the N x w block filled
    # with fill[i] (the row's drop threshold q_i, whose weight is +0 as every score at or below it has),
    # then its kept scores e in [starts[i], ends[i]) written at their columns poss[i][e] - c0
    for i in range(block.shape[0]):
        b, v_i, p_i = block[i], vals[i], poss[i]
        b[:] = fill[i]
        for e in range(starts[i], ends[i]):
            b[p_i[e] - c0] = v_i[e]


# DARE (competition.dare_flat): the drop mask of one tensor, drawn as torch.rand(n, generator=g) does on
# the CPU, where g = torch.Generator().manual_seed(seed) is ATen's at::mt19937 (the 32-bit Mersenne
# Twister, seeded with the seed's low 32 bits as std::mt19937 is), and the j-th uniform is
# (draw_j & 0xFFFFFF) * 2**-24, the draws taken in order (torch's serial CPU kernel). An entry is kept
# where u_j >= float32(p), i.e. where its 24 bits reach `threshold` = ceil(float32(p) * 2**24)
# (kernels.dare_threshold). kernels.dare_matches_torch checks the draws against torch's on first use.

MT_N, MT_M = 624, 397
MT_MATRIX_A = 0x9908B0DF


@jit
def mt19937_seed(seed, state):
    # at::mt19937(seed): state[0] = the seed's low 32 bits, state[j] = 1812433253 * (s ^ (s >> 30)) + j
    s = np.uint64(seed) & np.uint64(0xFFFFFFFF)
    state[0] = s
    for j in range(1, MT_N):
        s = (np.uint64(1812433253) * (s ^ (s >> np.uint64(30))) + np.uint64(j)) & np.uint64(0xFFFFFFFF)
        state[j] = s


@inline
def mt_twist_word(u, v, w):
    # w ^ twist(u, v): the upper bit of u and the lower 31 of v, shifted, xored with MATRIX_A where v is odd
    y = (u & 0x80000000) | (v & 0x7FFFFFFF)
    return w ^ (y >> 1) ^ ((v & 1) * MT_MATRIX_A)


@jit
def mt19937_next_state(mt):
    # the next 624 words (at::mt19937::next_state), each from words not yet replaced or replaced earlier in
    # the pass
    for i in range(MT_N - MT_M):
        mt[i] = mt_twist_word(mt[i], mt[i + 1], mt[i + MT_M])
    for i in range(MT_N - MT_M, MT_N - 1):
        mt[i] = mt_twist_word(mt[i], mt[i + 1], mt[i + MT_M - MT_N])
    mt[MT_N - 1] = mt_twist_word(mt[MT_N - 1], mt[0], mt[MT_M - 1])


@inline
def mt_temper(y):
    y ^= y >> 11
    y ^= (y << 7) & 0x9D2C5680
    y ^= (y << 15) & 0xEFC60000
    return y ^ (y >> 18)


@jit
def mt19937_uniform24(seed, out):
    # the first len(out) draws' 24 low bits (the uniforms times 2**24), for kernels.dare_matches_torch
    mt = np.empty(MT_N, np.uint32)
    mt19937_seed(seed, mt)
    for j0 in range(0, out.shape[0], MT_N):
        mt19937_next_state(mt)
        for t in range(min(MT_N, out.shape[0] - j0)):
            out[j0 + t] = mt_temper(np.int64(mt[t])) & 0xFFFFFF


@jit
def dare_drop_(x, seed, threshold, keep_scale):
    # x[j] = (x[j] * keep_j) / keep_scale with keep_j = 1 or 0 (float32): torch.mul(x, keep, out=x) then
    # x.div_(1 - p), keep_scale = float32(1 - p). In place, on one array: with a source and a destination
    # that may be one array, the compiler's overlap check sends the loop to its scalar version (4.7 ns per
    # entry in merge()'s DARE against 0.5); on the block's view, not indexed as x[j0 + t], for the same reason
    mt = np.empty(MT_N, np.uint32)
    mt19937_seed(seed, mt)
    for j0 in range(0, x.shape[0], MT_N):
        mt19937_next_state(mt)
        b = x[j0:j0 + MT_N]
        for t in range(b.shape[0]):
            keep = one32 if (mt_temper(np.int64(mt[t])) & 0xFFFFFF) >= threshold else zero32
            b[t] = (b[t] * keep) / keep_scale
