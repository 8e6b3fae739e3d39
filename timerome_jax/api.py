"""The public API: what the `timerome` CLI, the experiments and a user's script call.

    import ports
    from timerome_jax import api

    bb = ports.load_pretrained("tofu-tiny")
    tok = api.tokenizer(bb)
    facts = api.encode(bb, tok, api.load_facts("forget01_subjects"))
    traced = api.trace(bb, facts.take(range(8)), api.TraceConfig(steps=8, noise_samples=3))
    record = api.build_memory(bb, tok, facts, traced.coordinate, api.MemorySpec.selective(),
                              gate_facts=api.load_facts("retain90[40:160]"))
    edited = bb.with_edits(record.memory)        # every forward of `edited` carries the memory

Each function is a driver over the pure, jitted functions of `tracing`, `memory`, `likelihood`
and `evaluate`: it chunks facts into equal shapes (one compilation per shape; `mesh` splits them
over devices) and returns numpy results. A number an experiment reports is computed by the same
code as the command a user runs.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ports import Backbone
from timerome_jax import memory as mem
from timerome_jax import privacy, rewrite, splits, tokenization
from timerome_jax.errors import InputError
from timerome_jax.evaluate import GenerationConfig, evaluate_suite, generate_answers, metric_table
from timerome_jax.facts import Fact, Facts, load_facts, read_facts
from timerome_jax.facts import encode as _encode
from timerome_jax.likelihood import Pair, qa_pairs, score_pairs
from timerome_jax.memory import MemoryRecord, MemorySpec, SamplerCapture, load as load_memory, save as save_memory
from timerome_jax.suites import Suite, load_suite, suite_from_records
from timerome_jax.tracing import Coordinate, TraceConfig, Traced
from timerome_jax.tracing import trace as _trace


def tokenizer(backbone: Backbone):
    """The tokenizer saved with a loaded backbone's checkpoint (never downloaded)."""
    return tokenization.backbone_tokenizer(backbone)


def encode(backbone: Backbone, tokenizer, facts: Sequence[Fact]) -> Facts:
    """Tokenise facts for this model and locate their subjects (`facts.encode`)."""
    return _encode(tokenizer, facts, max_length=backbone.config.max_seq_len,
                   pad_id=tokenization.pad_token_id(tokenizer, backbone))


def trace(backbone: Backbone, facts: Facts, config: TraceConfig = TraceConfig(), *, seed: int = 0, k_min: int = 0,
          facts_per_chunk: int = 4, mesh=None, progress: Callable | None = None) -> Traced:
    """The TIE grid of the facts (noise keys from `jax.random.key(seed)`) and the coordinate
    (ℓ*, m*, k* ≥ k_min) it selects."""
    if facts_per_chunk < 1:
        raise InputError(f"facts per chunk must be >= 1, got {facts_per_chunk}")
    return _trace(backbone, facts.batch, config, jax.random.key(seed), k_min=k_min, facts_per_chunk=facts_per_chunk,
                  mesh=mesh, progress=progress)


def _entries(backbone: Backbone, tokenizer, facts: Facts, coordinate: Coordinate, spec: MemorySpec, steps, seed: int,
             facts_per_chunk: int, mesh, report: Callable[[str, dict], None]) -> mem.Entries:
    """Forgetting entries (`memory.capture`) or, with `spec.rewrite`, rewrite entries (`rewrite.capture`)."""
    if spec.rewrite is not None:
        keys, values, rows, info = rewrite.capture(backbone, tokenizer, facts, coordinate.layer, coordinate.module,
                                                   spec.rewrite, positions=spec.key_positions, seed=seed,
                                                   cases_per_chunk=facts_per_chunk, mesh=mesh)
        report("rewrite", info)
        return mem.Entries(keys, values, rows)
    return mem.capture(backbone, facts.batch, coordinate, jax.random.key(seed), steps=steps,
                       positions=spec.key_positions, sampler_capture=spec.sampler, noise_samples=spec.noise_samples,
                       noise_scale=spec.noise_scale, facts_per_chunk=facts_per_chunk, mesh=mesh)


def build_memory(backbone: Backbone, tokenizer, facts: Facts, coordinate: Coordinate,
                 spec: MemorySpec = MemorySpec(), *, seed: int = 0, gate_facts: Sequence[Fact] | None = None,
                 covariance_facts: Sequence[Fact] | None = None, facts_per_chunk: int = 4,
                 mesh=None, report: Callable[[str, dict], None] | None = None) -> MemoryRecord:
    """One edit memory of every fact at the coordinate, as `spec` says (noise keys from
    `jax.random.key(seed)`).

    gate_facts: retain facts that calibrate the gate (needed when `spec.gate_rate` is set).
    covariance_facts: retain facts whose key second moment C replaces λ̃ I by λ̃ C (the
    covariance-regularised memory; None: the plain ridge memory). Entries are fact-major and the
    record's `fact_ids` repeat per entry; `spec.q` counts entries. `report(stage, info)` receives
    the calibrations' details: ("covariance", `retain_whitening`'s info), ("gate", `retain_gate`'s),
    and for a rewrite memory (`spec.rewrite`: the facts' answers are the new objects) ("rewrite",
    `rewrite.capture`'s per-fact objective terms)."""
    report = report or (lambda stage, info: None)
    if (spec.gate_rate is None) != (gate_facts is None):
        raise InputError("a gate rate and gate facts go together (the rate is measured on those facts)")
    steps = (0,) if spec.rewrite is not None else spec.steps_for(coordinate)
    sampler_steps = 0 if spec.sampler is None else len(spec.sampler.capture_steps)
    if spec.key_positions == "last":   # "subject" has at least as many entries: checked after capture
        mem.check_hyperparameters(spec.alpha, spec.lam, spec.q, facts.num_facts * (len(steps) + sampler_steps))
    pad_id = None if gate_facts is None and covariance_facts is None else tokenization.pad_token_id(tokenizer, backbone)
    whitening = None
    if covariance_facts is not None:
        whitening, info = mem.retain_whitening(backbone, tokenizer, covariance_facts, coordinate, pad_id=pad_id,
                                               shrinkage=spec.shrinkage)
        report("covariance", info)
    entries = _entries(backbone, tokenizer, facts, coordinate, spec, steps, seed, facts_per_chunk, mesh, report)
    mem.check_hyperparameters(spec.alpha, spec.lam, spec.q, len(entries.keys))
    memory, key_scale = mem.build(entries.keys, entries.deltas, layer=coordinate.layer, module=coordinate.module,
                                  alpha=spec.alpha, lam=spec.lam, q=spec.q, whitening=whitening)
    check_not_degenerate(backbone, memory, facts)
    if spec.gate_rate is not None:
        gate, info = mem.retain_gate(backbone, tokenizer, gate_facts, memory, pad_id=pad_id, rate=spec.gate_rate)
        memory = mem.with_gate(memory, gate)
        report("gate", info)
    ids = facts.ids
    return MemoryRecord(memory, coordinate, spec.lam, key_scale, tuple(ids[r] for r in entries.rows),
                        backbone.fingerprint(), steps, spec.key_positions, spec.sampler, spec.rewrite)


def edit(backbone: Backbone, tokenizer, prompts: Sequence[str], target_new: Sequence[str], subject: Sequence[str], *,
         ground_truth: Sequence[str] | None = None, rephrase_prompts: Sequence | None = None,
         locality_prompts: Sequence | None = None, locality_ground_truth: Sequence | None = None,
         coordinate: Coordinate | None = None, spec: MemorySpec | None = None, seed: int = 0,
         gate_facts: Sequence[Fact] | None = None, mc_samples: int = 32) -> tuple[dict, Backbone, MemoryRecord]:
    """Rewrite facts, in the shape EasyEdit's `BaseEditor.edit` takes them: one call with the
    prompts, the new targets, the subjects and optionally the old objects, rephrasings and
    locality probes (one string or a list per case). Returns (metrics, edited backbone, memory
    record): metrics = {"pre": rows, "post": rows, "summary": {"pre", "post"}} with the per-case
    rows of `rewrite.case_metrics` before and after the edit.

    coordinate: where to edit (default: trace the old facts, prompt -> ground truth, which then must
    be given, over the MLP sites as ROME does); spec: the memory (default
    `MemorySpec.rewriting()`; its `rewrite` must be set); gate_facts: the facts a gated spec
    calibrates its gate on (default the split table's `retain_gate` part, as `timerome edit`). The
    backbone's weights are untouched: the edit is `edited.edits[-1]`, a memory like any other."""
    n = len(prompts)
    columns = dict(target_new=target_new, subject=subject, ground_truth=ground_truth, rephrase_prompt=rephrase_prompts,
                   locality_prompt=locality_prompts, locality_ground_truth=locality_ground_truth)
    for name, column in columns.items():
        if column is not None and len(column) != n:
            raise InputError(f"{len(column)} {name} value(s) for {n} prompt(s); give one per prompt")
    cases = [rewrite.parse_case({"prompt": prompts[i], **{k: v[i] for k, v in columns.items() if v is not None}},
                                f"case {i}") for i in range(n)]
    rewrite.check_distinct(cases)
    spec = MemorySpec.rewriting() if spec is None else spec
    if spec.rewrite is None:
        raise InputError("edit() builds a rewrite memory: its spec needs rewrite values (MemorySpec.rewriting())")
    if coordinate is None:
        if ground_truth is None:
            raise InputError("without a coordinate the old facts are traced, so ground_truth is needed")
        coordinate = trace(backbone, encode(backbone, tokenizer, [c.fact(target=c.ground_truth) for c in cases]),
                           TraceConfig(modules=("mlp",)), seed=seed).coordinate
    facts = encode(backbone, tokenizer, [c.fact() for c in cases])
    if spec.gate_rate is not None and gate_facts is None:   # as `timerome edit` does: the split table's gate part
        gate_facts = load_facts(splits.selection("retain_gate"))
    record = build_memory(backbone, tokenizer, facts, coordinate, spec, seed=seed, gate_facts=gate_facts)
    edited = backbone.with_edits(record.memory)
    pad_id = tokenization.pad_token_id(tokenizer, backbone)
    rows = {name: rewrite.case_metrics(model, backbone, tokenizer, cases, pad_id=pad_id, seeds=(seed,),
                                       mc_samples=mc_samples) for name, model in (("pre", backbone), ("post", edited))}
    rows["summary"] = {name: rewrite.summarise(rows[name]) for name in ("pre", "post")}
    return rows, edited, record


@jax.jit
def _answer_entropy(backbone: Backbone, batch) -> jax.Array:
    """(mean normalised entropy of the predictions at the answer positions, all logits finite)."""
    ids = jnp.where(batch.answer_mask_FT, backbone.mask_token_id, batch.input_ids_FT)
    logits = backbone.apply(ids, batch.attention_mask_FT)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1) / jnp.log(logits.shape[-1])
    take = batch.answer_mask_FT.astype(bool)
    return jnp.sum(jnp.where(take, entropy, 0.0)) / jnp.sum(take), jnp.all(jnp.isfinite(logits))


def check_not_degenerate(backbone: Backbone, memory: mem.EditMemory, facts: Facts) -> None:
    """Refuse a memory whose scale makes the edited model degenerate on its own facts (the first 8,
    answers masked): non-finite logits, or uniform predictions where the unedited model's are not.
    A huge α does this (RMSNorm of an overflowing residual stream); one error naming α."""
    batch = facts.take(range(min(8, facts.num_facts))).batch
    edited, finite = _answer_entropy(backbone.with_edits(memory), batch)
    plain, _ = _answer_entropy(backbone, batch)
    if not bool(finite) or (float(edited) > 0.99 and float(plain) < 0.99):
        what = "non-finite" if not bool(finite) else f"uniform (normalised entropy {float(edited):.3f})"
        raise InputError(f"alpha {float(memory.alpha):g} makes the edited model degenerate: its predictions at "
                         f"the facts' answers are {what}; use a smaller alpha")


def extend_memory(backbone: Backbone, record: MemoryRecord, facts: Facts, *, seed: int = 0, noise_samples: int = 10,
                  noise_scale: float = 3.0, facts_per_chunk: int = 4, mesh=None, tokenizer=None) -> MemoryRecord:
    """Insert facts into a built memory, captured as its own facts were (its coordinate, steps, key
    positions and sampler capture, or its rewrite values: those need the `tokenizer`), one
    incremental update per entry (`memory.insert`)."""
    duplicate = [f"{f.where} ({f.id})" for f in facts.facts if f.id in record.fact_ids]
    if duplicate:
        raise InputError(f"fact(s) already in the memory: {', '.join(duplicate[:5])}")
    if record.rewrite is not None and tokenizer is None:
        raise InputError("extending a rewrite memory needs the model's tokenizer")
    spec = MemorySpec(key_positions=record.key_positions, sampler=record.sampler_capture,
                      noise_samples=noise_samples, noise_scale=noise_scale, rewrite=record.rewrite)
    entries = _entries(backbone, tokenizer, facts, record.coordinate, spec, record.capture_steps, seed,
                       facts_per_chunk, mesh, lambda stage, info: None)
    memory = mem.insert(record.memory, entries.keys, entries.deltas)
    check_not_degenerate(backbone, memory, facts)
    ids = facts.ids
    return record.with_memory(memory, fact_ids=record.fact_ids + tuple(ids[r] for r in entries.rows))


def answer_lp(backbone: Backbone, tokenizer, facts: Sequence[Fact], tag: str, *, seeds: Sequence[int],
              mc_samples: int = 16, estimator: str = "mc_elbo", mesh=None) -> np.ndarray:
    """Answer log-probability of each fact (nats per answer) [len(seeds), len(facts)]. The MC masks
    depend on (seed, `tag`/index) only, so two models scored on the same facts and tag see the same
    masks (paired comparisons)."""
    return score_pairs(backbone, qa_pairs(tokenizer, facts, tag), list(seeds),
                       pad_id=tokenization.pad_token_id(tokenizer, backbone), estimator=estimator,
                       mc_samples=mc_samples, mesh=mesh)


def membership_inference(backbone: Backbone, tokenizer, members: Sequence[Fact], nonmembers: Sequence[Fact], *,
                         reference: Backbone | None = None, reference_tokenizer=None, k: float = privacy.MIN_K,
                         mesh=None) -> dict:
    """Membership inference of `members` (e.g. forget facts) against `nonmembers` (e.g. TOFU
    holdout facts) with the one-step per-token statistics (`timerome_jax.privacy`): the AUC of the
    LOSS, ZLib, Min-K % and Min-K %++ attacks, the members' exact memorisation and extraction
    strength, and with a `reference` (the retain twin) its AUCs and `privleak` (Min-K %)."""
    def report(model, tok):
        pad_id = tokenization.pad_token_id(tok, model)
        stats = [privacy.token_statistics(model, qa_pairs(tok, facts, tag), pad_id=pad_id, mesh=mesh)
                 for facts, tag in ((members, "member"), (nonmembers, "nonmember"))]
        texts = [[f.texts()[1] for f in facts] for facts in (members, nonmembers)]
        return privacy.membership_report(stats[0], texts[0], stats[1], texts[1], k)

    out = report(backbone, tokenizer)
    if reference is not None:
        out["reference"] = report(reference, tokenizer if reference_tokenizer is None else reference_tokenizer)
        key = f"mia_{privacy.PRIVLEAK_ATTACK}_auc"
        out["privleak"] = privacy.privleak_or_none(out[key], out["reference"][key])
    return out


def lm_evaluate(tasks: Sequence[str], *, model: str = "tofu-tiny", memory: str | None = None, mc_num: int = 32,
                estimator: str = "mc_elbo", gen_length: int | None = None, steps: int | None = None,
                block_length: int | None = None, batch_size: int = 32, seed: int = 0, include_paths: Sequence[str] = (),
                limit: int | None = None, num_fewshot: int | None = None, allow_download: bool = False) -> dict:
    """lm-evaluation-harness results of the `timerome` lm-eval model (`model`, edited by `memory`)
    on `tasks`: the offline tasks shipped here, a user's (`include_paths`) or lm-eval's own (which
    need the Hub: `allow_download`). Needs the `[lmeval]` extra (`timerome_jax.lm_eval_model`,
    docs/evaluation.md). The tasks are checked before the model is loaded."""
    try:
        from timerome_jax import lm_eval_model
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "lm_eval":
            raise
        raise InputError("lm-evaluation-harness is not installed: pip install -e '.[lmeval]'") from None
    lm_eval_model.check_run(limit, num_fewshot)
    lm_eval_model.set_offline(allow_download)
    resolved = lm_eval_model.resolve_tasks(tasks, include_paths)
    lm = lm_eval_model.TimeromeLM(pretrained=model, memory=memory, mc_num=mc_num, estimator=estimator,
                                  gen_length=gen_length, steps=steps, block_length=block_length, batch_size=batch_size,
                                  seed=seed)
    return lm_eval_model.evaluate_tasks(lm, tasks, limit=limit, num_fewshot=num_fewshot, allow_download=allow_download,
                                        resolved=resolved)


def generate(backbone: Backbone, tokenizer, facts: Sequence[Fact], *, gen_length: int = 96, steps: int = 48,
             block_length: int = 32, batch_size: int = 16) -> list[str]:
    """Greedy answers to the facts' prompts (in the model's prompt format), decoded and stripped."""
    prompts = [list(tokenizer(f.texts()[0], add_special_tokens=False)["input_ids"]) for f in facts]
    return generate_answers(backbone, tokenizer, prompts, gen_length=gen_length, steps=steps,
                            block_length=block_length, batch_size=batch_size,
                            pad_id=tokenization.pad_token_id(tokenizer, backbone))


__all__ = ["Coordinate", "Fact", "Facts", "GenerationConfig", "MemoryRecord", "MemorySpec", "Pair", "SamplerCapture",
           "Suite", "TraceConfig", "Traced", "answer_lp", "build_memory", "check_not_degenerate", "edit", "encode", "evaluate_suite", "extend_memory",
           "generate", "lm_evaluate", "load_facts", "load_memory", "load_suite", "membership_inference", "metric_table", "qa_pairs", "read_facts",
           "save_memory", "score_pairs", "suite_from_records", "tokenizer", "trace"]
