"""Objectives vs an independent NumPy implementation of docs/objectives.md, and gradients vs finite differences.

The NumPy reference below is written from docs/objectives.md (Pi1/Pi2 of the paper, the public code's logits
form and loss-type formulas), in float64, one group at a time, without sharing code with the library.
"""
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iopo_jax.objectives import OBJECTIVES, ObjectiveConfig, get_objective

LOSS_TYPES = ["sigmoid", "robust", "exo_pair", "hinge", "ipo"]


# ------------------------------------------------------------------ NumPy reference (float64)

def logsig(x):
    return -np.logaddexp(0.0, -x)


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_loss(l, beta, loss_type, eps):
    """The loss types of docs/objectives.md applied to the unscaled logit l (z = b*l there)."""
    bl = beta * l
    if loss_type == "sigmoid":
        return -logsig(bl) * (1 - eps) - logsig(-bl) * eps
    if loss_type == "robust":
        return (-logsig(bl) * (1 - eps) + logsig(-bl) * eps) / (1 - 2 * eps)
    if loss_type == "exo_pair":
        e = eps if eps else 1e-3
        return sig(bl) * (logsig(bl) - np.log(1 - e)) + sig(-bl) * (logsig(-bl) - np.log(e))
    if loss_type == "hinge":
        return max(0.0, 1 - bl)
    if loss_type == "ipo":
        return (l - 1 / (2 * beta)) ** 2
    raise AssertionError(loss_type)


def np_reference(name, pol, ref, cnt, cfg):
    """Loss of objective `name` for a batch [G, K] (float64), written from docs/objectives.md."""
    beta, lt, eps, ftx = cfg.get("beta", 0.1), cfg.get("loss_type", "sigmoid"), cfg.get("label_smoothing", 0.0), cfg.get("pref_ftx", 0.0)
    G, K = pol.shape
    avg = pol / cnt
    # IPO (and orpo/simpo) use length-averaged log-probs.
    use = avg if lt == "ipo" else pol
    use_ref = (ref / cnt if lt == "ipo" else ref) if ref is not None else None
    per_group = []
    for g in range(G):
        if name == "sft":
            continue
        if name in ("orpo", "simpo"):
            pairs = [(0, 1)] if K == 2 else [(0, 1), (2, 3)]
            terms = []
            for w, l in pairs:
                if name == "simpo":
                    terms.append(-logsig(beta * (avg[g, w] - avg[g, l]) - cfg["simpo_gamma"]))
                else:
                    lo_w = avg[g, w] - np.log(1 - np.exp(avg[g, w]))
                    lo_l = avg[g, l] - np.log(1 - np.exp(avg[g, l]))
                    terms.append(-avg[g, w] + cfg["orpo_lambda"] * -logsig(lo_w - lo_l))
            val = np.mean(terms)
            if name == "simpo" and ftx:
                val += ftx * sum(-avg[g, c] for c in ([0] if K == 2 else [0, 2]))
            per_group.append(val)
            continue
        h = [use[g, k] - use_ref[g, k] for k in range(K)]
        if name == "iopo":
            c1, r1, c2, r2 = use[g]
            rc1, rr1, rc2, rr2 = use_ref[g]
            # the public code's form
            logits = 0.5 * (((2 * c1 - r1 - r2) - (2 * rc1 - rr1 - rr2)) + ((2 * c2 - r2 - r1) - (2 * rc2 - rr2 - rr1)))
            # the paper's form: (Pi1 + Pi2) / 2 must equal beta * logits
            h11, h12, h22, h21 = h
            pi1 = beta * (h11 - h12) + beta * (h11 - h21)
            pi2 = beta * (h22 - h21) + beta * (h22 - h12)
            assert abs((pi1 + pi2) / 2 - beta * logits) < 1e-9 * (1 + abs(pi1) + abs(pi2))
            terms = [np_loss(logits, beta, lt, eps)]
            chosen = [0, 2]
        elif name == "iopo_star":
            h11, h12 = h[0], h[1]
            h21 = h[2] if K == 3 else h[3]
            terms = [np_loss(2 * h11 - h12 - h21, beta, lt, eps)]
            chosen = [0]
        elif name in ("dpo", "iopo_no_input"):
            if K == 2:
                terms, chosen = [np_loss(h[0] - h[1], beta, lt, eps)], [0]
            else:  # (x1: y1 > y2) and (x2: y2 > y1)
                terms, chosen = [np_loss(h[0] - h[1], beta, lt, eps), np_loss(h[2] - h[3], beta, lt, eps)], [0, 2]
        elif name == "iopo_no_output":
            h11, h12, h22, h21 = h
            terms, chosen = [np_loss(h11 - h21, beta, lt, eps), np_loss(h22 - h12, beta, lt, eps)], [0, 2]
        else:
            raise AssertionError(name)
        val = np.mean(terms)
        if ftx:
            val += ftx * sum(-avg[g, c] for c in chosen)
        per_group.append(val)
    if name == "sft":
        cols = [0] if K < 4 else [0, 2]
        if cfg.get("sft_reduction", "token") == "token":
            return sum(-pol[:, c].sum() for c in cols) / sum(cnt[:, c].sum() for c in cols)
        return np.mean([np.mean([-avg[g, c] for c in cols]) for g in range(G)])
    return float(np.mean(per_group))


def random_batch(rng, G, K, spread=2.0):
    cnt = rng.integers(5, 60, size=(G, K)).astype(np.float64)
    pol = -rng.uniform(0.05, 2.5, size=(G, K)) * cnt
    ref = pol + rng.normal(0.0, spread, size=(G, K))
    return pol, ref, cnt


CASES = [
    ("dpo", 2), ("dpo", 4), ("iopo", 4), ("iopo_star", 3), ("iopo_star", 4),
    ("iopo_no_input", 4), ("iopo_no_output", 4),
]
SMOOTH_FTX = [(0.0, 0.0), (0.1, 0.0), (0.0, 0.5), (0.2, 1.0)]


@pytest.mark.parametrize("name,K", CASES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("eps,ftx", SMOOTH_FTX)
def test_reference_objectives_match_numpy(name, K, loss_type, eps, ftx):
    rng = np.random.default_rng(zlib.crc32(repr((name, K, loss_type, eps, ftx)).encode()))
    pol, ref, cnt = random_batch(rng, 6, K, spread=20.0 if loss_type != "ipo" else 1.0)
    cfg = dict(beta=0.1, loss_type=loss_type, label_smoothing=eps, pref_ftx=ftx)
    loss, metrics = get_objective(name)(pol, ref, cnt, cfg)
    want = np_reference(name, pol, ref, cnt, cfg)
    np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-6)
    assert float(metrics["loss"]) == pytest.approx(float(loss))
    # reward metrics: beta * h of each column (h on averaged log-probs for ipo)
    use, use_ref = (pol / cnt, ref / cnt) if loss_type == "ipo" else (pol, ref)
    rewards = 0.1 * (use - use_ref)
    names = {2: ["chosen", "rejected"], 3: ["chosen_v1", "rejected_v1", "rejected_v2"],
             4: ["chosen_v1", "rejected_v1", "chosen_v2", "rejected_v2"]}[K]
    for k, n in enumerate(names):
        np.testing.assert_allclose(float(metrics[f"rewards/{n}"]), rewards[:, k].mean(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(metrics[f"logps/{n}"]), use[:, k].mean(), rtol=1e-5, atol=1e-6)
    if K == 4:
        for sfx, a, b in [("_v1", 0, 1), ("_v2", 2, 3)]:
            np.testing.assert_allclose(float(metrics[f"rewards/accuracies{sfx}"]), (rewards[:, a] > rewards[:, b]).mean())
            np.testing.assert_allclose(float(metrics[f"rewards/margins{sfx}"]), (rewards[:, a] - rewards[:, b]).mean(),
                                       rtol=1e-5, atol=1e-6)
    if K == 2:
        np.testing.assert_allclose(float(metrics["rewards/accuracies"]), (rewards[:, 0] > rewards[:, 1]).mean())


@pytest.mark.parametrize("name,K", [("orpo", 2), ("orpo", 4), ("simpo", 2), ("simpo", 4)])
@pytest.mark.parametrize("ftx", [0.0, 0.7])
def test_reference_free_objectives_match_numpy(name, K, ftx):
    if name == "orpo" and ftx:
        with pytest.raises(ValueError, match="pref_ftx"):
            get_objective(name)(*random_batch(np.random.default_rng(0), 2, K), dict(pref_ftx=ftx))
        return
    rng = np.random.default_rng(K * 7 + int(ftx * 10))
    pol, _, cnt = random_batch(rng, 5, K)
    cfg = dict(beta=2.0, simpo_gamma=0.8, orpo_lambda=0.25, pref_ftx=ftx)
    loss, metrics = get_objective(name)(pol, None, cnt, cfg)  # reference-free: None accepted
    np.testing.assert_allclose(float(loss), np_reference(name, pol, None, cnt, cfg), rtol=2e-5, atol=1e-6)
    first = "chosen" if K == 2 else "chosen_v1"
    np.testing.assert_allclose(float(metrics[f"rewards/{first}"]), (2.0 * pol / cnt)[:, 0].mean(), rtol=1e-5)


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_sft_matches_numpy(K, reduction):
    rng = np.random.default_rng(K)
    pol, _, cnt = random_batch(rng, 4, K)
    cfg = dict(sft_reduction=reduction)
    loss, metrics = get_objective("sft")(pol, None, cnt, cfg)
    np.testing.assert_allclose(float(loss), np_reference("sft", pol, None, cnt, cfg), rtol=1e-5)


def test_weights_drop_padding_groups():
    rng = np.random.default_rng(3)
    pol, ref, cnt = random_batch(rng, 5, 4)
    w = np.array([1, 0, 1, 1, 0], np.float32)
    keep = w > 0
    cnt_pad = cnt.copy()
    cnt_pad[~keep] = 0  # padding groups may have zero tokens
    lm = rng.normal(size=(5, 4))
    for name in OBJECTIVES:
        full, m_full = get_objective(name)(pol, ref, cnt_pad, dict(pref_ftx=0.0), weights=w, logits_mean=lm)
        sub, m_sub = get_objective(name)(pol[keep], ref[keep], cnt[keep], {}, logits_mean=lm[keep])
        assert np.isfinite(float(full)), name
        np.testing.assert_allclose(float(full), float(sub), rtol=1e-5, err_msg=name)
        assert set(m_full) == set(m_sub)
        for key in m_sub:
            np.testing.assert_allclose(float(m_full[key]), float(m_sub[key]), rtol=1e-5, atol=1e-6, err_msg=f"{name} {key}")
    np.testing.assert_allclose(float(m_sub["logits/chosen_v2"]), lm[keep][:, 2].mean(), rtol=1e-5)


def test_iopo_input_accuracies_and_logits_metrics():
    pol = np.array([[-10.0, -20.0, -12.0, -11.0]])
    ref = np.array([[-15.0, -15.0, -15.0, -15.0]])
    cnt = np.full((1, 4), 10.0)
    _, m = get_objective("iopo")(pol, ref, cnt, dict(beta=1.0), logits_mean=np.array([[1.0, 2.0, 3.0, 4.0]]))
    # h = [5, -5, 3, 4]; v1: 5 > -5, v2: 3 > 4 is false; input_v1: h11 > h21 (5 > 4); input_v2: h22 > h12 (3 > -5)
    assert float(m["rewards/accuracies_v1"]) == 1.0 and float(m["rewards/accuracies_v2"]) == 0.0
    assert float(m["rewards/accuracies_input_v1"]) == 1.0 and float(m["rewards/accuracies_input_v2"]) == 1.0
    assert float(m["rewards/margins_v2"]) == pytest.approx(-1.0)
    assert float(m["logits/rejected_v2"]) == 4.0


def test_bad_input_messages():
    pol, ref, cnt = random_batch(np.random.default_rng(0), 2, 2)
    with pytest.raises(ValueError, match="group size K=2"):
        get_objective("iopo")(pol, ref, cnt)
    with pytest.raises(ValueError, match="needs reference"):
        get_objective("dpo")(pol, None, cnt)
    with pytest.raises(ValueError, match="unknown objective 'ppo'"):
        get_objective("ppo")
    with pytest.raises(ValueError, match="loss_type"):
        ObjectiveConfig(loss_type="kto")
    with pytest.raises(ValueError, match=r"config\.objective does not match ObjectiveConfig: unknown fields: betta"):
        get_objective("dpo")(pol, ref, cnt, {"betta": 0.1})


def test_jit_and_static_config():
    pol, ref, cnt = random_batch(np.random.default_rng(1), 3, 4)
    cfg = ObjectiveConfig(beta=0.2, loss_type="robust", label_smoothing=0.1)
    fn = jax.jit(lambda p, r, c: get_objective("iopo")(p, r, c, cfg))
    loss, metrics = fn(pol, ref, cnt)
    eager, _ = get_objective("iopo")(pol, ref, cnt, cfg)
    np.testing.assert_allclose(float(loss), float(eager), rtol=1e-6)
    assert loss.dtype == jnp.float32


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


GRAD_CASES = [(n, k, lt) for n, k in CASES for lt in LOSS_TYPES if (n == "iopo" or lt in ("sigmoid", "ipo"))] + [
    ("orpo", 2, "sigmoid"), ("orpo", 4, "sigmoid"), ("simpo", 4, "sigmoid"), ("sft", 4, "sigmoid"),
]


@pytest.mark.parametrize("name,K,loss_type", GRAD_CASES)
def test_gradient_matches_finite_differences(x64, name, K, loss_type):
    """jax.grad (float64) of our objective vs central differences of the NumPy reference."""
    rng = np.random.default_rng(11)
    pol, ref, cnt = random_batch(rng, 3, K, spread=5.0)
    cfg = dict(beta=0.3, loss_type=loss_type, label_smoothing=0.05 if loss_type != "ipo" else 0.0,
               pref_ftx=0.3 if name not in ("orpo", "sft") else 0.0, simpo_gamma=0.5, orpo_lambda=0.2)
    needs_ref = OBJECTIVES[name].needs_reference

    def f(p, r):
        return get_objective(name)(p, r if needs_ref else None, jnp.asarray(cnt), cfg)[0]

    gp, gr = jax.grad(f, argnums=(0, 1))(jnp.asarray(pol, jnp.float64), jnp.asarray(ref, jnp.float64))
    assert gp.dtype == jnp.float64
    step = 1e-5
    num_p, num_r = np.zeros_like(pol), np.zeros_like(ref)
    for idx in np.ndindex(pol.shape):
        for arr, out, is_ref in ((pol, num_p, False), (ref, num_r, True)):
            if is_ref and not needs_ref:
                continue
            hi, lo = arr.copy(), arr.copy()
            hi[idx] += step
            lo[idx] -= step
            args_hi = (pol, hi) if is_ref else (hi, ref)
            args_lo = (pol, lo) if is_ref else (lo, ref)
            out[idx] = (np_reference(name, *args_hi, cnt, cfg) - np_reference(name, *args_lo, cnt, cfg)) / (2 * step)
    np.testing.assert_allclose(np.asarray(gp), num_p, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(np.asarray(gr), num_r if needs_ref else 0.0, rtol=1e-5, atol=1e-8)
    assert np.abs(num_p).max() > 0  # the check is not vacuous
