"""GrootLMixer: each mode against its definition written out with Python loops, causality,
gradients, parameters and argument checks (the transformers side is in
tests/integrations/test_transformers.py)."""
import math

import pytest
import torch

from captured_step import check_captured_step
from oracle import kruskal_parents
from treessm.nn.grootl import MODES, GrootLMixer
from treessm.topology import chain_tree

RTOL = 1e-5  # the causal tree's tie tolerance


def perturbed(mixer, seed=0):
    # away from the initialisation, so that every parameter shows in the comparisons
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return mixer


def silu(v):
    return v / (1 + math.exp(-v))


def loop_inputs(m, s):
    """u, z, x = Δ B u, w = exp(Δ A) and C of one sequence ``s [L, d_model]``, entry by
    entry."""
    length = s.shape[0]
    d, n, r, kk = m.intermediate_size, m.ssm_state_size, m.time_step_rank, m.conv_kernel_size
    win, wconv, bconv = m.in_proj.weight, m.conv1d.weight, m.conv1d.bias
    xz = [[float(win[j] @ s[t]) for j in range(2 * d)] for t in range(length)]
    pre = [row[:d] for row in xz]
    z = [row[d:] for row in xz]
    u = [[silu(float(bconv[c]) + sum(float(wconv[c, 0, j]) * pre[t - kk + 1 + j][c]
                                     for j in range(kk) if t - kk + 1 + j >= 0))
          for c in range(d)] for t in range(length)]
    ut = torch.tensor(u, dtype=torch.float64)
    proj = ut @ m.x_proj.weight.T
    dt, bb, cc = proj[:, :r], proj[:, r:r + n], proj[:, r + n:]
    x, w = [], []
    for t in range(length):
        delta = [math.log1p(math.exp(float(m.dt_proj.weight[c] @ dt[t] + m.dt_proj.bias[c])))
                 for c in range(d)]
        x.append([[delta[c] * float(bb[t, i]) * u[t][c] for i in range(n)] for c in range(d)])
        w.append([[math.exp(-delta[c] * math.exp(float(m.A_log[c, i]))) for i in range(n)]
                  for c in range(d)])
    return u, z, torch.tensor(x, dtype=torch.float64), torch.tensor(w, dtype=torch.float64), cc


def loop_output(m, u, z, h, cc):
    length, d = len(u), m.intermediate_size
    y = [[(float(h[t, c] @ cc[t]) + float(m.D[c]) * u[t][c]) * silu(z[t][c]) for c in range(d)]
         for t in range(length)]
    return torch.tensor(y, dtype=torch.float64) @ m.out_proj.weight.T


def cosine_cost(a, b):
    return math.exp(-float(a @ b) / max(float(a.norm()) * float(b.norm()), 1e-24))


def loop_causal_parent(feat, t, k):
    cands = list(range(max(0, t - k), t))
    if not cands:
        return -1
    costs = {s: cosine_cost(feat[s], feat[t]) for s in cands}
    low = min(costs.values())
    return max(s for s in cands if costs[s] <= low + RTOL * low)


def loop_grootl_parent(feat, context_len):
    """Kruskal over the chain and the skips (s, t), t - s <= 3, among the first
    context_len tokens; rooted at the last token."""
    length = feat.shape[0]
    c = length if context_len is None else min(context_len, length)
    pairs = {(t, t + 1) for t in range(length - 1)}
    if c > 2:
        pairs |= {(s, t) for t in range(c) for s in range(max(0, t - 3), t)}
    return kruskal_parents(length, pairs, lambda s, t: cosine_cost(feat[s], feat[t]),
                           length - 1)


def loop_mixer(m, s):
    """The mixer's output on one sequence from its definition."""
    u, z, x, w, cc = loop_inputs(m, s)
    length = x.shape[0]
    h = torch.zeros_like(x)
    if m.mode in ("chain", "paper"):
        for t in range(length):
            h[t] = x[t] + (w[t] * h[t - 1] if t else 0)
    if m.mode == "causal":
        feat = x.reshape(length, -1)
        for t in range(length):
            p = loop_causal_parent(feat, t, m.k)
            h[t] = x[t] + (w[t] * h[p] if p >= 0 else 0)
    if m.mode == "paper":
        parent = loop_grootl_parent(x.reshape(length, -1), m.context_len)
        up = {}

        def aggregate(v):  # leaf to root; the edge (c, parent c) carries w[c + 1]
            if v not in up:
                up[v] = x[v] + sum((w[c + 1] * aggregate(c) for c in range(length)
                                    if parent[c] == v), torch.zeros_like(x[v]))
            return up[v]

        for v in range(length):
            h[v] = h[v] + m.tree_scale * aggregate(v)
    return loop_output(m, u, z, h, cc)


@pytest.mark.parametrize("mode, options", [("chain", {}), ("causal", dict(k=1)),
                                           ("causal", dict(k=3)), ("paper", {}),
                                           ("paper", dict(context_len=5, tree_scale=0.7))])
def test_each_mode_matches_its_definition(mode, options):
    torch.manual_seed(0)
    m = perturbed(GrootLMixer(6, state_size=3, expand=1.5, conv_kernel=3, mode=mode,
                              **options).double())
    s = torch.randn(2, 9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = m(s)
    assert out.shape == s.shape and out.dtype == torch.float64
    with torch.no_grad():
        for b in range(2):
            torch.testing.assert_close(out[b], loop_mixer(m, s[b]), rtol=1e-9, atol=1e-10)


def test_scan_tree_is_the_tree_of_the_forward_pass():
    torch.manual_seed(0)
    s = torch.randn(2, 9, 8)
    chain = GrootLMixer(8, state_size=3)
    assert torch.equal(chain.scan_tree(s).parent, torch.tensor(
        [-1, 0, 1, 2, 3, 4, 5, 6, 7, -1, 9, 10, 11, 12, 13, 14, 15, 16]))
    causal = GrootLMixer(8, state_size=3, mode="causal", k=3)
    causal.load_state_dict(chain.state_dict())
    with torch.no_grad():
        x = causal.tree_features(causal.project_in(s)[0])
    exact = GrootLMixer(8, state_size=3, mode="causal", k=3).double()
    exact.load_state_dict(chain.state_dict())
    with torch.no_grad():  # the features are the scan inputs x = Δ B u of the definition
        x64 = exact.tree_features(exact.project_in(s.double())[0])
    for b in range(2):
        torch.testing.assert_close(x64[b], loop_inputs(exact, s[b].double())[2].reshape(9, -1))
    expected = [loop_causal_parent(x[b].reshape(9, -1).double(), t, 3) for b in range(2)
                for t in range(9)]
    got = causal.scan_tree(s).parent.tolist()
    assert [p - 9 * (i // 9) if p >= 0 else -1 for i, p in enumerate(got)] == expected
    paper = GrootLMixer(8, state_size=3, mode="paper")
    assert paper.scan_tree(s).roots.tolist() == [8, 17]


@pytest.mark.parametrize("mode,extra", [("causal", dict(k=3)), ("paper", {}),
                                        ("paper", dict(context_len=6))])
def test_trees_compare_the_factors_of_the_scan_inputs(mode, extra):
    # with the cosine distance the causal and GrootL trees are built from the factors
    # (delta u, B) of the scan inputs, never formed: the same tree as the topology over
    # the formed scan inputs
    torch.manual_seed(3)
    mixer = GrootLMixer(16, state_size=4, mode=mode, **extra)
    hidden = torch.randn(2, 13, 16)
    u, _ = mixer.project_in(hidden, None)
    expected = mixer.topology(mixer.tree_features(u))
    tree = mixer.scan_tree(hidden)
    for name in ("parent", "order", "child_ptr", "tree_ptr", "depth"):
        assert torch.equal(getattr(tree, name), getattr(expected, name)), name
    a, b = mixer.tree_factors(u)
    assert a.shape == (2, 13, mixer.intermediate_size) and b.shape == (2, 13, 4)


def test_causal_with_k_one_is_the_chain():
    torch.manual_seed(0)
    chain = GrootLMixer(8, state_size=4)
    causal = GrootLMixer(8, state_size=4, mode="causal", k=1)
    causal.load_state_dict(chain.state_dict())
    s = torch.randn(3, 10, 8)
    torch.testing.assert_close(causal(s), chain(s))


@pytest.mark.parametrize("mode", ["chain", "causal"])
def test_later_tokens_never_change_earlier_outputs(mode):
    torch.manual_seed(0)
    m = perturbed(GrootLMixer(8, state_size=4, mode=mode))
    s = torch.randn(2, 12, 8)
    out = m(s)
    for t in (0, 5, 10):
        changed = s.clone()
        changed[:, t + 1:] = torch.randn(2, 11 - t, 8)
        torch.testing.assert_close(m(changed)[:, :t + 1], out[:, :t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(m(changed)[:, t + 1:], out[:, t + 1:])


def test_paper_mode_sees_the_future():
    torch.manual_seed(0)
    m = perturbed(GrootLMixer(8, state_size=4, mode="paper", tree_scale=1.0))
    s = torch.randn(1, 12, 8)
    changed = s.clone()
    changed[:, 8:] = torch.randn(1, 4, 8)
    assert not torch.allclose(m(changed)[:, :8], m(s)[:, :8])
    # tokens from context_len - 1 on lie on the chain to the root: they see only the past
    m.context_len = 6
    out = m(s)
    for t in range(5, 11):
        changed = s.clone()
        changed[:, t + 1:] = torch.randn(1, 11 - t, 8)
        torch.testing.assert_close(m(changed)[:, 5:t + 1], out[:, 5:t + 1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_gradients_reach_every_parameter(mode):
    torch.manual_seed(0)
    m = perturbed(GrootLMixer(8, state_size=4, mode=mode))
    s = torch.randn(2, 7, 8, requires_grad=True)
    out = m(s)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert s.grad.abs().sum() > 0


def test_gradcheck_causal_float64():
    torch.manual_seed(0)
    m = GrootLMixer(3, state_size=2, expand=1, mode="causal", k=2).double()
    s = torch.randn(1, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (s,))


def test_left_padding_is_invisible():
    # padded inputs are zeroed and never become parents: the real tokens' outputs are those
    # of the unpadded sequence
    torch.manual_seed(0)
    for mode in ("chain", "causal"):
        m = perturbed(GrootLMixer(8, state_size=4, mode=mode))
        s = torch.randn(1, 6, 8)
        padded = torch.cat([torch.randn(1, 3, 8), s], 1)
        mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
        torch.testing.assert_close(m(padded, attention_mask=mask)[:, 3:], m(s), rtol=1e-5,
                                   atol=1e-6)


def test_bfloat16_inputs_scan_in_float32():
    torch.manual_seed(0)
    m = GrootLMixer(8, state_size=4, mode="causal")
    s = torch.randn(2, 6, 8)
    out = m.to(torch.bfloat16)(s.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    u = torch.randn(1, 2, m.intermediate_size, dtype=torch.bfloat16)
    assert m.tree_features(u).dtype == torch.float32
    assert m.ssm(u[0], chain_tree(1, 2), "down").dtype == torch.float32


def test_parameters_init_and_repr():
    m = GrootLMixer(32, state_size=4, mode="causal", k=3)
    assert m.intermediate_size == 64 and m.time_step_rank == 2
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert list(shapes.items()) == [
        ("A_log", (64, 4)), ("D", (64,)), ("conv1d.weight", (64, 1, 4)), ("conv1d.bias", (64,)),
        ("in_proj.weight", (128, 32)), ("x_proj.weight", (10, 64)), ("dt_proj.weight", (64, 2)),
        ("dt_proj.bias", (64,)), ("out_proj.weight", (32, 64))]
    torch.testing.assert_close(m.A_log, torch.log(torch.arange(1.0, 5.0)).expand(64, 4))
    dt = torch.nn.functional.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    text = repr(m)
    assert text.startswith("GrootLMixer(\n  32, d_inner=64, d_state=4, dt_rank=2, d_conv=4, "
                           "layer_idx=0, mode='causal', k=3\n")
    assert "(in_proj): Linear(in_features=32, out_features=128" in text
    assert "(conv1d): Conv1d(64, 64, kernel_size=(4,)" in text
    paper = GrootLMixer(16, mode="paper", context_len=8)
    assert "context_len=8, tree_scale=0.3" in repr(paper)
    paper.context_len = None
    assert paper.context_len is None and paper.topology.context_len is None


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(mode="tree"), ValueError, "mode must be one of"),
    (dict(mode="causal", k=0), ValueError, "k must be a positive int"),
    (dict(mode="chain", k=2), ValueError, "k is used with mode='causal'"),
    (dict(mode="causal", context_len=4), ValueError, "context_len is used with mode='paper'"),
    (dict(mode="chain", tree_scale=0.5), ValueError, "tree_scale is used with mode='paper'"),
    (dict(mode="paper", tree_scale=math.inf), ValueError, "tree_scale"),
    (dict(state_size=0), ValueError, "state_size"),
    (dict(hidden_act="mish"), ValueError, "hidden_act"),
    (dict(backend="gpu"), ValueError, "backend"),
    (dict(layer_idx=-1), ValueError, "layer_idx"),
    (dict(mode="causal", distance="manhattan"), ValueError, "distance"),
])
def test_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        GrootLMixer(8, **kwargs)


def test_invalid_inputs():
    m = GrootLMixer(8)
    with pytest.raises(ValueError, match=r"\[B, L, 8\]"):
        m(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="attention_mask"):
        m(torch.randn(2, 5, 8), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="cache once"):
        m(torch.randn(2, 5, 8), cache=object(), cache_params=object())
    with pytest.raises(ValueError, match="mode='paper' only"):
        m.context_len = 3
    with pytest.raises(TypeError, match="MambaConfig"):
        GrootLMixer.from_config(object())


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: torch.cuda.is_available() is False")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("mode", MODES)
def test_cuda_matches_cpu(mode):
    torch.manual_seed(0)
    m = perturbed(GrootLMixer(16, state_size=4, mode=mode))
    s = torch.randn(3, 40, 16, requires_grad=True)
    ref = m(s)
    (ref * torch.linspace(-1, 1, 16)).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    gpu = m.to("cuda")
    sc = s.detach().cuda().requires_grad_()
    out = gpu(sc)
    (out * torch.linspace(-1, 1, 16, device="cuda")).sum().backward()
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sc.grad.cpu(), s.grad, rtol=1e-3, atol=1e-5)
    for n, p in gpu.named_parameters():
        torch.testing.assert_close(p.grad.cpu(), grads[n], rtol=1e-3, atol=1e-4)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("mode", MODES)
def test_cuda_graph_capture_of_a_training_step(mode):
    # the whole step (the causal or paper tree built on the device, the fused scan, the
    # backward) captured in a CUDA graph; replays for new tokens equal eager steps
    torch.manual_seed(1)
    m = perturbed(GrootLMixer(32, state_size=8, mode=mode)).cuda()
    g = torch.Generator().manual_seed(2)
    static = torch.randn(2, 96, 32, generator=g).cuda().requires_grad_()
    fresh = [torch.randn(2, 96, 32, generator=g).cuda() for _ in range(2)]
    check_captured_step(lambda s: m(s).square().sum(), static, m.parameters(), fresh)


def test_topology_argument():
    from treessm.topology import CausalSequenceTopology, SequenceTopology

    s = torch.randn(2, 12, 16, dtype=torch.float64)
    # causal: a topology of the layer's kind gives the layer built from its k and distance
    torch.manual_seed(0)
    given = GrootLMixer(16, state_size=4, mode="causal",
                        topology=CausalSequenceTopology(2, "l2")).double()
    torch.manual_seed(0)
    built = GrootLMixer(16, state_size=4, mode="causal", k=2, distance="l2").double()
    assert given.k == 2 and torch.equal(given(s), built(s))
    # paper: any topology; the tree it builds is the one scanned
    torch.manual_seed(0)
    seq = GrootLMixer(16, state_size=4, mode="paper", topology=SequenceTopology(2)).double()
    tree = seq.scan_tree(s)
    assert torch.equal(tree.parent, SequenceTopology(2)(seq.tree_features(
        seq.project_in(s)[0])).parent)
    torch.manual_seed(0)
    default = GrootLMixer(16, state_size=4, mode="paper").double()
    assert not torch.allclose(seq(s), default(s))  # rooted at the first token, not the last
    assert seq.context_len is None
    with pytest.raises(ValueError, match="context_len belongs to the GrootL topology"):
        seq.context_len = 4


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(mode="chain", topology=chain_tree), ValueError, "topology is used with mode"),
    (dict(mode="causal", topology=chain_tree), TypeError, "must be a CausalSequenceTopology"),
    (dict(mode="paper", topology="tree"), TypeError, "topology must be a callable"),
    (dict(mode="causal", k=3, topology=None), None, None),
])
def test_topology_argument_errors(kwargs, error, match):
    from treessm.topology import CausalSequenceTopology

    if error is None:  # k and a topology together are refused
        with pytest.raises(ValueError, match="give k to the topology"):
            GrootLMixer(8, mode="causal", k=3, topology=CausalSequenceTopology(3))
        return
    with pytest.raises(error, match=match):
        GrootLMixer(8, **kwargs)
