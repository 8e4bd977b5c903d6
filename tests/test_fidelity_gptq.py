"""GPTQ, OWQ and QEFT as their authors' code runs them, pinned against restatements written here.

Each `ref_*` below restates, in the references' own loop structure, what IST-DASLab/gptq (`gptq.py` fasterquant,
`quant.py` find_params), xvyaward/owq (`owq/recon.py`, `owq/quant.py`, `main.py`) and xvyaward/qeft
(`extract_outidx.py`, `qeft/recon.py`) compute: fake-quantized weights Q from a weight W and a Hessian H. Ours must
dequantize to the same Q bit for bit on the same inputs (docs/fidelity.md). The restatements share nothing with
qpeft_bench's code.
"""

from __future__ import annotations

import math

import pytest
import torch

from qpeft_bench.quant import fit, gptq, owq, qeft, weakcol
from qpeft_bench.quant.qlinear import dequantize_groups, unpack

# ----------------------------------------------------------------------------------------------------------------
# Restatements of the references
# ----------------------------------------------------------------------------------------------------------------


class RefQuantizer:
    """find_params/quantize of the references: GPTQ's min-max (mse=False) and OWQ/QEFT's MSE search (mse=True)."""

    def __init__(self, bits, mse=False, sym=False):
        self.maxq, self.mse, self.sym, self.levels = 2**bits - 1, mse, sym, 2**bits

    def find_params(self, x, num=100):
        tmp = torch.zeros(x.shape[0])
        xmin = torch.minimum(x.min(1)[0], tmp)
        xmax = torch.maximum(x.max(1)[0], tmp)
        if self.mse:
            best_score = torch.zeros_like(xmin) + 1e10
            best_min, best_max = xmin.clone(), xmax.clone()
            xrange = xmax - xmin
            tmp_min = torch.zeros_like(xmin)
            eps = torch.tensor(1e-8)
            for i in range(1, num + 1):
                tmp_max = xrange / num * i
                scale = torch.max((tmp_max - tmp_min) / self.maxq, eps)
                delta = scale.clone()
                scale = scale.reshape(-1, 1)
                x_round = torch.round(x / scale)
                for zp in range(self.levels):
                    new_min = tmp_min - zp * delta
                    new_max = tmp_max - zp * delta
                    zero = torch.clamp(0 - torch.round(new_min / delta), 0, self.maxq).reshape(-1, 1)
                    x_q = scale * (torch.clamp(x_round + zero, 0, self.maxq) - zero)
                    score = (x - x_q).abs().pow(2.4).flatten(1).mean(1)
                    best_min = torch.where(score < best_score, new_min, best_min)
                    best_max = torch.where(score < best_score, new_max, best_max)
                    best_score = torch.min(best_score, score)
            min_neg = torch.min(best_min, torch.zeros_like(best_min))
            max_pos = torch.max(best_max, torch.zeros_like(best_max))
            self.scale = torch.max((max_pos - min_neg) / self.maxq, eps)
            self.zero = torch.clamp(0 - torch.round(min_neg / self.scale), 0, self.maxq)
        else:
            if self.sym:
                xmax = torch.maximum(torch.abs(xmin), xmax)
                tmp = xmin < 0
                if torch.any(tmp):
                    xmin[tmp] = -xmax[tmp]
            tmp = (xmin == 0) & (xmax == 0)
            xmin[tmp] = -1
            xmax[tmp] = +1
            self.scale = (xmax - xmin) / self.maxq
            self.zero = (
                torch.full_like(self.scale, (self.maxq + 1) / 2) if self.sym else torch.round(-xmin / self.scale)
            )
        self.scale, self.zero = self.scale.reshape(-1, 1), self.zero.reshape(-1, 1)

    def quantize(self, x):
        q = torch.clamp(torch.round(x / self.scale) + self.zero, 0, self.maxq)
        return self.scale * (q - self.zero)


def ref_fasterquant(W, H, quantizer, groupsize, ids=None, n_out=0, static_groups=False, percdamp=0.01, num=None):
    """GPTQ's column sweep as the references write it; returns Q (in input order). `ids`: OWQ's processing order
    (weak columns last); `num`: the MSE grid of each group's find_params (OWQ/QEFT pass 40)."""
    W = W.clone().float()
    H = H.clone()
    columns = W.shape[1]
    n_nonout = columns - n_out
    if ids is not None:
        W = W[:, ids]
        H = H[ids][:, ids]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    groups = []
    if static_groups:  # IST-DASLab's --static-groups (before its act-order permutation: ids is None here)
        import copy

        for i in range(0, columns, groupsize):
            q = copy.deepcopy(quantizer)
            q.find_params(W[:, i : i + groupsize])
            groups.append(q)
    perm = None
    if static_groups and getattr(quantizer, "actorder", False):
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    blocksize = 128
    for i1 in range(0, n_nonout, blocksize):
        i2 = min(i1 + blocksize, n_nonout)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if static_groups:
                idx = i1 + i if perm is None else perm[i1 + i]
                quantizer = groups[idx // groupsize]
            elif (i1 + i) % groupsize == 0:
                sl = W[:, (i1 + i) : min(i1 + i + groupsize, columns - n_out)]
                quantizer.find_params(sl) if num is None else quantizer.find_params(sl, num=num)
            q = quantizer.quantize(w.unsqueeze(1)).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if n_out:
        Q[:, n_nonout:] = W[:, n_nonout:]
    if ids is not None:
        Q = Q[:, torch.argsort(ids)]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q


def ref_owq_ids(W, H, n_out, bits, actorder=False, frob=True):
    """OWQ's main.py + hessian_sorting: score H_jj * ||W - Q(W)||^2 per column with a temporary whole-row MSE
    quantizer (num=40), weak = the n_out largest; ids = [others, weak]."""
    H_diag = torch.diag(H)
    if frob:
        tq = RefQuantizer(bits, mse=True)
        tq.find_params(W.float(), num=40)
        H_diag = H_diag * (W.float() - tq.quantize(W.float())).pow(2).sum(dim=0)
    desc = torch.argsort(H_diag, descending=True)
    mask = torch.full([W.shape[1]], True)
    mask[desc[:n_out]] = False
    if actorder:
        return torch.cat([desc[n_out:], desc[:n_out]]), desc[:n_out]
    return torch.cat([torch.arange(W.shape[1])[mask], desc[:n_out]]), desc[:n_out]


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------


def _layer(out=48, n_in=256, seed=0, dead=(7,)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, n_in, generator=gen) @ (torch.eye(n_in) + 0.3 * torch.randn(n_in, n_in, generator=gen))
    x[:, 3] *= 20  # an outlier channel, as LLMs have
    for j in dead:
        x[:, j] = 0
    W = torch.randn(out, n_in, generator=gen) * 0.02
    W[:, 11] *= 8
    return W, 2 * x.T @ x / x.shape[0]


def _linear(W):
    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    lin.weight.data = W.clone()
    return lin


def _ours_gptq(W, H, bits, g, **knobs):
    cfg = gptq.Config(bits=bits, group_size=g, **knobs)
    layer = gptq.quantize_linear(_linear(W), cfg, "float32", "cpu", H)
    return layer.dequantize()


# ----------------------------------------------------------------------------------------------------------------
# GPTQ
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits, g", [(4, 128), (3, 32), (4, 64)])
def test_gptq_dynamic_groups_are_the_references_bit_for_bit(bits, g):
    # g < 128 (the lazy block): groups starting inside a block are fitted from W as the previous blocks left it
    W, H = _layer()
    want = ref_fasterquant(W, H, RefQuantizer(bits), g)
    assert torch.equal(_ours_gptq(W, H, bits, g), want)


def test_gptq_static_groups_with_act_order_are_the_references_static_groups():
    W, H = _layer(seed=1)
    q = RefQuantizer(4)
    q.actorder = True
    want = ref_fasterquant(W, H, q, 64, static_groups=True)
    assert torch.equal(_ours_gptq(W, H, 4, 64, act_order=True, static_groups=True), want)


def test_gptq_symmetric_fit_is_the_references():
    W, H = _layer(seed=2)
    W[:4] = W[:4].abs()  # rows with no negative weight: the reference keeps their minimum at 0
    want = ref_fasterquant(W, H, RefQuantizer(4, sym=True), 64)
    assert torch.equal(_ours_gptq(W, H, 4, 64, symmetric=True), want)


def test_rounding_ties_round_before_shifting_the_zero_point():
    # w / s = 2.5 exactly with an odd zero point: round(2.5) + 3 = 5, while round(2.5 + 3) = 6 (ties to even)
    s, z = torch.tensor([1.0]), torch.tensor([3.0])
    assert fit.encode(torch.tensor([2.5]), s, z, 4).item() == 5
    assert fit.encode(torch.tensor([-1.5]), s, z, 4).item() == 1  # round(-1.5) = -2


def test_minmax_fit_edge_cases_are_the_references():
    x = torch.tensor([[0.5, 0.25, 1.0, 0.75], [0.0, 0.0, 0.0, 0.0], [-1.0, -0.5, -0.25, -2.0], [-1.0, 3.0, 0.5, 0.0]])
    for sym in (False, True):
        ref = RefQuantizer(3, sym=sym)
        ref.find_params(x.clone())
        s, z = fit.minmax(x, 3, sym)
        assert torch.equal(s, ref.scale.flatten()) and torch.equal(z, ref.zero.flatten()), sym


def test_act_order_with_dynamic_groups_is_refused_not_stored_otherwise():
    from qpeft_bench.config import ConfigError

    with pytest.raises(ConfigError, match="static_groups=true"):
        gptq.Config(act_order=True).check("quant")
    with pytest.raises(ConfigError, match="static_groups=true"):
        owq.Config(act_order=True).check("quant")


# ----------------------------------------------------------------------------------------------------------------
# The MSE fit and OWQ
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits, num", [(3, 40), (4, 40), (4, 100), (2, 1)])
def test_mse_fit_is_owqs_grid_search(bits, num):
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(bits + num)) * 0.05
    x[0] += 0.1  # a row with no negative weight
    ref = RefQuantizer(bits, mse=True)
    ref.find_params(x.clone(), num=num)
    s, z = fit.mse(x, bits, num)
    assert torch.equal(s, ref.scale.flatten()) and torch.equal(z, ref.zero.flatten())


def test_mse_fit_lowers_the_objective_it_searches():
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(5)) * 0.02
    x[:, 0] *= 10  # a heavy column: min-max wastes levels on it

    def objective(s, z):
        s, z = s.unsqueeze(1), z.unsqueeze(1)
        return float((s * (fit.encode(x, s, z, 3) - z) - x).abs().pow(2.4).mean())

    assert objective(*fit.mse(x, 3, 40)) < 0.95 * objective(*fit.minmax(x, 3))


@pytest.mark.parametrize("bits, g, k", [(4, 64, 8), (3, 32, 6), (4, 128, 16)])
def test_owq_is_the_references_weak_columns_and_compact_dynamic_groups(bits, g, k):
    # in - k is not a multiple of g: the last compact group is short, as in the reference
    W, H = _layer(seed=bits + k)
    ids, weak = ref_owq_ids(W, H, k, bits)
    want = ref_fasterquant(W, H, RefQuantizer(bits, mse=True), g, ids=ids, n_out=k, num=40)
    cfg = owq.Config(bits=bits, group_size=g, k=k)
    layer = owq.quantize_linear(_linear(W), cfg, "float32", "cpu", H)
    assert torch.equal(layer.weak_idx.long(), weak)  # decreasing score, as the reference orders them
    assert torch.equal(layer.dequantize(), want)


def test_owq_scores_by_the_whole_row_error_not_the_group_error():
    W, H = _layer(seed=9)
    _, weak = ref_owq_ids(W, H, 8, 4)
    got, _ = owq.weak_columns(W, torch.diagonal(H), owq.Config(k=8))
    assert torch.equal(got, weak)
    _, by_h = ref_owq_ids(W, H, 8, 4, frob=False)
    got_h, _ = owq.weak_columns(W, torch.diagonal(H), owq.Config(k=8, score_with_error=False))
    assert torch.equal(got_h, by_h)


def test_owq_layer_stores_what_it_computes_and_plan_mode_counts_it():
    W, H = _layer(seed=3)
    cfg = owq.Config(bits=3, group_size=32, k=6)
    layer = owq.quantize_linear(_linear(W), cfg, "float32", "cpu", H)
    n_rest = W.shape[1] - 6
    codes = unpack(layer.qweight, 3)[:, :n_rest]
    rest = dequantize_groups(unpack(layer.qweight, 3), layer.scales, layer.zeros, 32)[:, :n_rest]
    assert int(codes.max()) <= 7
    mask = torch.ones(W.shape[1], dtype=torch.bool)
    mask[layer.weak_idx.long()] = False
    assert torch.equal(layer.dequantize()[:, mask], rest)
    held = sum(t.numel() * t.element_size() for t in (*layer.buffers(), *layer.parameters()))
    assert weakcol.linear_storage(W.shape[1], W.shape[0], False, cfg, "float32")[0] == held
    assert layer.scales.shape[1] == weakcol.stored_width(n_rest, 32) // 32 >= math.ceil(n_rest / 32)


# ----------------------------------------------------------------------------------------------------------------
# QEFT
# ----------------------------------------------------------------------------------------------------------------


def ref_qeft_outidx(per_layer_diags, k):
    """extract_outidx.py with --no_frob_norm: every stream reader's H_jj / mean, summed; the k largest, sorted."""
    total = torch.zeros(per_layer_diags[0].shape[0])
    for d in per_layer_diags:
        total += d / d.mean()
    return sorted(torch.topk(total, k).indices.tolist())


def test_qeft_global_set_lets_every_reader_vote_3_to_2():
    # q, k, v read the attention input (one Hessian), gate and up the MLP input (another)
    n = 64
    attn, mlp = torch.ones(n), torch.ones(n)
    attn[10], mlp[10] = 9.0, 9.0  # weak in both
    attn[11] = 4.0  # attention only: three votes
    mlp[40] = 5.5  # MLP only: two votes, but larger
    layers = [attn, attn, attn, mlp, mlp]
    want = ref_qeft_outidx(layers, 2)
    assert want == [10, 11]
    assert qeft.global_weak_columns(layers, 2).tolist() == want
    assert qeft.global_weak_columns([attn, mlp], 2).tolist() == [10, 40]  # global_vote=inputs: one vote each


def test_qeft_reordered_reader_is_the_references_gptq_with_the_global_set():
    # The reference quantizes in the original order with ids = [others, global set] and reorders afterwards; we
    # reorder first (weak channels at 0..k-1) and quantize: the same weights once permuted back.
    W, H = _layer(seed=4)
    weak = torch.tensor([3, 11, 20, 100])
    others = torch.tensor([j for j in range(W.shape[1]) if j not in weak.tolist()])
    want = ref_fasterquant(W, H, RefQuantizer(4, mse=True), 64, ids=torch.cat([others, weak]), n_out=4, num=40)
    perm = qeft.weak_first(weak, W.shape[1])
    cfg = qeft.Config(bits=4, group_size=64, k=4)
    layer = qeft.quantize_linear(_linear(W[:, perm]), cfg, "float32", "cpu", (H[perm][:, perm], torch.arange(4)))
    assert layer.contiguous
    assert torch.equal(layer.dequantize()[:, torch.argsort(perm)], want)


def test_qeft_nearest_is_the_references_round_to_nearest_with_the_global_set():
    W, _ = _layer(seed=6)
    weak = torch.tensor([0, 1, 2, 3])  # reordered: the global set first
    n_nonout = W.shape[1] - 4
    ids = torch.cat([torch.arange(4, W.shape[1]), weak])
    Wp = W[:, ids]
    Q = torch.zeros_like(Wp)
    q = RefQuantizer(4, mse=True)
    for start in range(0, n_nonout, 64):  # fasterquant_nearest_owq_reorder: compact groups, find_params num=1
        end = min(start + 64, n_nonout)
        q.find_params(Wp[:, start:end], num=1)
        Q[:, start:end] = q.quantize(Wp[:, start:end])
    Q[:, n_nonout:] = Wp[:, n_nonout:]
    want = Q[:, torch.argsort(ids)]
    cfg = qeft.Config(bits=4, group_size=64, k=4, method="nearest")
    layer = qeft.quantize_linear(_linear(W), cfg, "float32", "cpu", (None, weak))
    assert torch.equal(layer.dequantize(), want)
