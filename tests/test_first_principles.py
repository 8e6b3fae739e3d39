"""δ and the TIE grid against references written from DESIGN.md alone.

The reference is a float64 numpy LLaDA forward over the fixture's ORIGINAL PyTorch tensors (read
from model.safetensors by their checkpoint names; no `ports`, no Flax, no interceptor), first
checked against the PyTorch logits in golden.npz. On it, with its own numpy noise:

* δ (DESIGN §3): mean over noise draws of (value_corrupted − value_clean) of the site at the last
  subject token, the subject's input embeddings corrupted by N(0, (ν σ)²), σ the std of the
  subject tokens' embedding coordinates;
* TIE (DESIGN §2): the teacher-forced clean trajectory (reveal in the clean model's confidence
  order, write the true tokens), the corrupted run on the same states, and the patched run that
  restores one module's clean output at the subject positions at one layer and step; read-out =
  Σ over still-masked answer positions of log p(true token).

The implementation draws its own noise, so δ and TIE are compared as Monte-Carlo estimates of the
same expectation (many draws on both sides): direction and size, not bits. The deterministic
parts (keys, clean read-outs) are compared exactly.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import ports
from timerome_jax import api, memory as mem

from conftest import fixture_dir

MODULES = ("resid", "attn", "mlp")
FACT = {"prompt": "the cat sat on the", "subject": "the cat", "target": "mat and looked"}
NU = 3.0


class Reference:
    """LLaDA (llama blocks, RoPE, RMSNorm, SwiGLU, bidirectional attention) in float64 numpy."""

    def __init__(self, folder):
        self.w = {k: v.astype(np.float64) for k, v in load_file(str(folder / "model.safetensors")).items()}
        self.c = json.loads((folder / "config.json").read_text())
        self.L, self.H = self.c["n_layers"], self.c["n_heads"]

    def _rms(self, x, weight):
        return x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + self.c["rms_norm_eps"]) * weight

    def _rope(self, x):                       # x [T, H, Dh]; rotate-half form, positions 0..T-1
        T, _, dh = x.shape
        inv = 1.0 / self.c["rope_theta"] ** (np.arange(0, dh, 2) / dh)
        angles = np.arange(T)[:, None] * inv[None]
        cos, sin = (np.concatenate([f(angles)] * 2, axis=-1)[:, None] for f in (np.cos, np.sin))
        rotated = np.concatenate([-x[..., dh // 2:], x[..., :dh // 2]], axis=-1)
        return x * cos + rotated * sin

    def forward(self, ids, noise=None, patch=None):
        """(logits [T, V], sites {(layer, module): (key, value)}) for one sequence. `noise` [T, D]
        is added to the input embeddings; `patch` = (layer, module, positions, rows) sets that
        module's output rows (the value) before the residual addition / as the block output."""
        p = "model.transformer."
        x = self.w[p + "wte.weight"][np.asarray(ids)]
        if noise is not None:
            x = x + noise
        T, D = x.shape
        dh = D // self.H
        sites = {}

        def patched(layer, module, value):
            if patch is not None and patch[0] == layer and patch[1] == module:
                value = value.copy()
                value[patch[2]] = patch[3]
            return value

        for layer in range(self.L):
            b = f"{p}blocks.{layer}."
            h = self._rms(x, self.w[b + "attn_norm.weight"])
            q, k, v = (h @ self.w[b + f"{n}_proj.weight"].T for n in "qkv")
            q, k = (self._rope(t.reshape(T, self.H, dh)) for t in (q, k))
            scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(dh)
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            attn_key = np.einsum("hqk,khd->qhd", weights, v.reshape(T, self.H, dh)).reshape(T, D)
            attn = patched(layer, "attn", attn_key @ self.w[b + "attn_out.weight"].T)
            x = x + attn
            h = self._rms(x, self.w[b + "ff_norm.weight"])
            gate, up = h @ self.w[b + "ff_proj.weight"].T, h @ self.w[b + "up_proj.weight"].T
            mlp_key = gate / (1 + np.exp(-gate)) * up
            mlp = patched(layer, "mlp", mlp_key @ self.w[b + "ff_out.weight"].T)
            x = patched(layer, "resid", x + mlp)
            sites[layer, "attn"], sites[layer, "mlp"], sites[layer, "resid"] = (attn_key, attn), (mlp_key, mlp), (x, x)
        logits = self._rms(x, self.w[p + "ln_f.weight"]) @ self.w[p + "ff_out.weight"].T
        return logits, sites


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def ref():
    return Reference(fixture_dir("llada"))


@pytest.fixture(scope="module")
def setup(tiny_model_dir_with_tokenizer):
    backbone = ports.load_pretrained(tiny_model_dir_with_tokenizer)
    tok = api.tokenizer(backbone)
    facts = api.encode(backbone, tok, [api.Fact(FACT["prompt"], FACT["target"], FACT["subject"])])
    prompt, answer, (s0, s1) = list(facts.prompts[0]), list(facts.answers[0]), facts.spans[0]
    return backbone, facts, prompt, answer, list(range(s0, s1))


def test_the_reference_forward_matches_pytorch(ref):
    golden = np.load(fixture_dir("llada") / "golden.npz")
    for row in range(golden["input_ids"].shape[0]):
        logits, _ = ref.forward(golden["input_ids"][row])
        np.testing.assert_allclose(logits, golden["logits_f64"][row], atol=1e-4, rtol=1e-4)


def _sigma(ref, prompt, subject):
    vectors = ref.w["model.transformer.wte.weight"][np.asarray(prompt)[subject]]
    return vectors.std()


@pytest.mark.parametrize("layer, module", [(1, "mlp"), (0, "attn"), (2, "resid")])
def test_delta_and_key_follow_the_definition(ref, setup, layer, module):
    backbone, facts, prompt, answer, subject = setup
    mask = backbone.mask_token_id
    state = prompt + [mask] * len(answer)            # step 0: the answer fully masked
    last, draws = subject[-1], 400
    _, clean = ref.forward(state)
    rng = np.random.default_rng(7)
    sigma = _sigma(ref, prompt, subject)
    corrupted = []
    for _ in range(draws):
        noise = np.zeros((len(state), clean[0, "mlp"][1].shape[1]))
        noise[subject] = rng.normal(0.0, NU * sigma, (len(subject), noise.shape[1]))
        corrupted.append(ref.forward(state, noise=noise)[1][layer, module][1][last])
    reference_delta = np.mean(corrupted, axis=0) - clean[layer, module][1][last]

    where = api.Coordinate(layer=layer, module=module, step=0, steps=4)
    entries = mem.capture(backbone, facts.batch, where, jax.random.key(3), noise_samples=draws, noise_scale=NU)
    np.testing.assert_allclose(entries.keys[0], clean[layer, module][0][last], atol=1e-4, rtol=1e-4)
    delta = entries.deltas[0]
    cosine = float(delta @ reference_delta / np.linalg.norm(delta) / np.linalg.norm(reference_delta))
    # independent Monte-Carlo estimates of one expectation: same direction and size (a flipped
    # sign gives a cosine near −1, a missing mean or a wrong σ a different size)
    assert cosine > 0.9, cosine
    assert 0.8 < np.linalg.norm(delta) / np.linalg.norm(reference_delta) < 1.25


def _reference_tie(ref, prompt, answer, subject, mask, steps, draws, rng):
    """(tie [K, L, M], clean [K], corrupted [K]) from DESIGN §2, one fact, window 1."""
    P, A = len(prompt), len(answer)
    counts = [A // steps + (1 if k < A % steps else 0) for k in range(steps)]
    masked = np.ones(A, bool)
    states, still = [], []
    for k in range(steps):                           # the teacher-forced clean trajectory
        ids = prompt + [mask if masked[j] else answer[j] for j in range(A)]
        states.append(ids), still.append(masked.copy())
        probs = np.exp(log_softmax(ref.forward(ids)[0][P:]))
        confidence = np.where(masked, probs.max(-1), -np.inf)
        order = sorted(range(A), key=lambda j: (-confidence[j], j))
        for j in order[:counts[k]]:
            masked[j] = False

    def readout(logits, k):
        lp = log_softmax(logits[P:])[np.arange(A), answer]
        return float(np.sum(np.where(still[k], lp, 0.0)))

    sigma = _sigma(ref, prompt, subject)
    clean_runs = [ref.forward(s) for s in states]
    clean_lp = np.array([readout(clean_runs[k][0], k) for k in range(steps)])
    D = clean_runs[0][1][0, "mlp"][1].shape[1]
    tie = np.zeros((steps, ref.L, len(MODULES)))
    corrupted_lp = np.zeros(steps)
    for _ in range(draws):
        noise = np.zeros((P + A, D))
        noise[subject] = rng.normal(0.0, NU * sigma, (len(subject), D))
        for k in range(steps):
            base = readout(ref.forward(states[k], noise=noise)[0], k)
            corrupted_lp[k] += base / draws
            for layer in range(ref.L):
                for m, module in enumerate(MODULES):
                    rows = clean_runs[k][1][layer, module][1][subject]
                    patched = ref.forward(states[k], noise=noise, patch=(layer, module, subject, rows))[0]
                    tie[k, layer, m] += (readout(patched, k) - base) / draws
    return tie, clean_lp, corrupted_lp


def test_tie_grid_follows_the_definition(ref, setup):
    backbone, facts, prompt, answer, subject = setup
    steps, draws = 2, 120
    tie, clean_lp, corrupted_lp = _reference_tie(ref, prompt, answer, subject, backbone.mask_token_id, steps, draws,
                                                 np.random.default_rng(11))
    traced = api.trace(backbone, facts, api.TraceConfig(steps=steps, noise_samples=draws, modules=MODULES), seed=5)
    result = traced.result
    np.testing.assert_allclose(np.asarray(result.clean_lp)[0], clean_lp, atol=1e-3)     # deterministic
    np.testing.assert_allclose(np.asarray(result.corrupted_lp)[0], corrupted_lp, atol=0.15 * np.abs(clean_lp).max())
    mine = np.asarray(result.tie)[0]
    scale = np.abs(tie).max()
    assert scale > 0.05                                   # the corruption matters on this fact
    assert np.corrcoef(mine.ravel(), tie.ravel())[0, 1] > 0.9
    np.testing.assert_allclose(mine, tie, atol=0.2 * scale)
    # the cell of largest effect is the same
    assert np.unravel_index(np.argmax(mine), mine.shape) == np.unravel_index(np.argmax(tie), tie.shape)


def test_an_edit_lowers_forget_lp_and_a_random_sign_memory_does_not():
    """On the embedded model: the memory of 8 forget facts lowers their answer LP far more than the
    same memory with every δ coordinate's sign drawn at random (same norms, same keys) or with
    every δ negated. Measured on tofu-tiny v3 (α = 1, layer 1): −61.3, −6.3 and −22.7 nats; on v4
    (2026-12-06, layer 0 where `timerome demo` traces its facts) α = 1 moves forget LP by 3.1 nats
    only, so the test scales the memory to α = 4: −112.5, −32.1 and −43.8 nats."""
    import dataclasses

    backbone = ports.load_pretrained("tofu-tiny")
    tok = api.tokenizer(backbone)
    forget = api.encode(backbone, tok, api.load_facts("forget01_subjects[:8]"))
    where = api.Coordinate(layer=0, module="resid", step=0, steps=8)   # where `timerome demo` traces v4's facts
    memory = api.build_memory(backbone, tok, forget, where, api.MemorySpec.paper(noise_samples=3)).memory
    memory = mem.with_hyperparameters(memory, alpha=4.0)
    signs = np.random.default_rng(0).choice([-1.0, 1.0], size=memory.deltas.shape).astype(np.float32)
    variants = {"memory": memory, "random sign": dataclasses.replace(memory, deltas=memory.deltas * signs),
                "negated": dataclasses.replace(memory, deltas=-memory.deltas)}
    lp = lambda model: float(api.answer_lp(model, tok, forget.facts, "forget", seeds=[0], mc_samples=8).mean())  # noqa: E731
    base = lp(backbone)
    drop = {name: base - lp(backbone.with_edits(m)) for name, m in variants.items()}
    assert drop["memory"] > 20.0, drop
    assert drop["memory"] > 3 * drop["random sign"] and drop["memory"] > 1.5 * drop["negated"], drop
