"""Policy lab: many policy settings scored on one prefill per prompt, with transformers.

    python -m benchmarks.lab --configs snapkv@0.25 "snapkv@0.25:kernel_size=21" leankv@0.25 \\
        [--tasks multivalue vartrack] [--contexts 1000 2000] [--samples 4] [--held-out] \\
        [--out results/lab.json]

An accuracy run through vLLM spends nearly all its time in prefill, and prefill
is the same for every policy: it runs dense, then the policy compresses. The lab
runs each prompt's prefill once (transformers, float32, the default model) and
then every configuration's greedy decode over that cache, the evicted keys masked
out of attention. Masking is the same softmax as attending over the kept tokens
alone, so a sweep of N settings costs one prefill a prompt instead of N servers.

A configuration is ``policy@budget``, optionally followed by ``:key=value,...``
policy fields (``window``, ``sink_tokens`` and the policy's own arguments); the
full cache runs first. It emulates what the serving path does with the same
policy objects: the layer plan of ``paging.accounting`` (the floor of sinks plus
window), every policy's prefill selection (layer and per-head budgets, ChunkKV's
reused indices) and the eviction of the policies that hold their budget while
decoding (H2O, StreamingLLM). It does not emulate page formats (``--kv-quant``,
LeanKV's K8V4), SpindleKV's merging, PoD's shared keys or Quest's per-step pages;
those policies are refused. Each configuration's *kept* is the share of the
prompt's token-heads it kept after prefill, which per-head and dynamic budgets
(Ada-KV, LeanKV) may leave below the budget.

Use it to explore; benchmarks.accuracy, which serves through vLLM, is what the
results report. ``--held-out`` draws benchmarks.tuning's prompts (other seeds and
depths than the grid's).
"""

from __future__ import annotations

import argparse
import ast
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks.results import machine, save
from benchmarks.tasks import TASKS, score
from vllm_kvcompress.decode import SELECTORS
from vllm_kvcompress.paging.accounting import plan_layers
from vllm_kvcompress.policies import LayerInputs, Policy, build_policy
from vllm_kvcompress.policies.base import runtime_traits

ATTENTION = "kvcompress_lab"
MASS_CHUNK = 256  # prompt queries per block when summing prefill attention mass


@dataclass
class Config:
    """One setting: a policy (None: the full cache) and the text it was given as."""

    name: str
    policy: Policy | None


def parse_config(text: str) -> Config:
    """``policy@budget[:key=value,...]``, e.g. ``snapkv@0.25:kernel_size=21,window=64``."""
    head, _, args = text.partition(":")
    name, at, budget = head.partition("@")
    if not at:
        raise ValueError(f"{text!r}: expected policy@budget[:key=value,...]")
    kwargs = {}
    for item in filter(None, args.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"{text!r}: {item!r} is not key=value")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()  # a bare word, e.g. pooling=avg
    if name in SELECTORS:
        raise ValueError(f"{text!r}: the lab cannot emulate {name} (a decode reader: it "
                         "chooses the pages each step reads, on the serving path)")
    try:
        policy = build_policy(name, budget=float(budget), **kwargs)
    except TypeError as e:  # an unknown field
        raise ValueError(f"{text!r}: {e}") from None
    needs = runtime_traits(policy)
    if needs.counts or needs.shared_keys:
        raise ValueError(f"{text!r}: the lab cannot emulate {name} (SpindleKV's merging and "
                         "PoD's shared keys need the serving path)")
    return Config(text, policy)


@dataclass
class _Decode:
    """One configuration's decode state, per layer: kept slots, and mass where needed."""

    policy: Policy | None
    caps: tuple[int, ...]
    keep: list[torch.Tensor]  # [H, tokens so far] bool
    mass: list[torch.Tensor | None] = field(default_factory=list)


class Lab:
    """The model with an attention function that captures prefill and masks decode."""

    def __init__(self, model_path: str):
        from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

        AttentionInterface.register(ATTENTION, self._attention)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.float32, attn_implementation=ATTENTION).eval()
        config = self.model.config
        self.num_layers = config.num_hidden_layers
        head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
        self.scale = head_dim ** -0.5
        # Where generation stops: the generation config's end tokens, as vLLM reads them.
        ends = self.model.generation_config.eos_token_id
        self.ends = {self.tokenizer.eos_token_id, *(ends if isinstance(ends, list) else [ends])}
        self.window = 0  # prefill: queries kept per layer
        self.want_mass = False
        self.queries: dict[int, torch.Tensor] = {}
        self.mass: dict[int, torch.Tensor] = {}
        self.decode: _Decode | None = None

    # -- attention ---------------------------------------------------------
    def _attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                   **kwargs):
        # query [1, Hq, Tq, D]; key, value [1, H, Tk, D]; positions are cache indices.
        layer, groups = module.layer_idx, query.shape[1] // key.shape[1]
        k = key.repeat_interleave(groups, dim=1)
        v = value.repeat_interleave(groups, dim=1)
        if self.decode is None:
            self.queries[layer] = query[0, :, -self.window:].clone()
            if self.want_mass:
                self.mass[layer] = self._prefill_mass(query[0], k[0], scaling, groups)
            out = F.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scaling)
            return out.transpose(1, 2).contiguous(), None
        state = self.decode
        keep = torch.cat([state.keep[layer], torch.ones(key.shape[1], 1, dtype=torch.bool)], 1)
        logits = (query @ k.transpose(-1, -2)) * scaling  # [1, Hq, 1, Tk]
        logits = logits.masked_fill(~keep.repeat_interleave(groups, 0)[None, :, None], -torch.inf)
        probs = logits.softmax(-1)
        out = probs @ v
        if state.mass:
            mass = torch.cat([state.mass[layer], torch.zeros(key.shape[1], 1)], 1)
            state.mass[layer] = mass + probs[0, :, 0].unflatten(0, (-1, groups)).sum(1)
        state.keep[layer] = self._evict(state, layer, keep)
        return out.transpose(1, 2).contiguous(), None

    @staticmethod
    def _prefill_mass(query, keys, scale, groups) -> torch.Tensor:
        """[H, T] attention every key received from all prompt queries, summed per group."""
        heads, tokens, _ = query.shape
        total = torch.zeros(heads, tokens)
        for start in range(0, tokens, MASS_CHUNK):
            q = query[:, start:start + MASS_CHUNK]
            logits = q @ keys.transpose(-1, -2) * scale
            rows = torch.arange(start, start + q.shape[1])
            logits.masked_fill_(torch.arange(tokens)[None, :] > rows[:, None], -torch.inf)
            total += logits.softmax(-1).sum(1)
        return total.unflatten(0, (-1, groups)).sum(1)

    @staticmethod
    def _evict(state: _Decode, layer: int, keep: torch.Tensor) -> torch.Tensor:
        """A capped policy's lowest-ranked slots out, back to the layer's cap."""
        if state.policy is None or not state.policy.decode_capped:
            return keep
        cap = state.caps[layer]
        over = keep.sum(1) - cap
        if over.max() <= 0:
            return keep
        tokens = keep.shape[1]
        positions = torch.arange(tokens).expand_as(keep).masked_fill(~keep, -1)
        mass = state.mass[layer] if state.mass else torch.zeros(keep.shape)
        newest = torch.full((keep.shape[0],), tokens - 1)
        scores = state.policy.slot_scores(positions, mass, newest, cap).float()
        scores = scores.masked_fill(~keep, torch.inf)  # gone already
        rank = scores.argsort(1).argsort(1)
        return keep & (rank >= over.clamp(min=0)[:, None])

    # -- one prompt --------------------------------------------------------
    @torch.no_grad()
    def run_prompt(self, sample, configs: list[Config]) -> list[tuple[str, float]]:
        """Each configuration's (output text, kept share) for one prompt."""
        ids = self.tokenizer(sample.prompt, return_tensors="pt").input_ids
        tokens = ids.shape[1]
        policies = [c.policy for c in configs if c.policy is not None]
        self.window = max([p.window for p in policies], default=1)
        self.want_mass = any(p.needs_attention_mass for p in policies)
        self.decode, self.queries, self.mass = None, {}, {}
        out = self.model(ids, use_cache=True)
        cache, first = out.past_key_values, int(out.logits[0, -1].argmax())
        results = []
        for config in configs:
            self.decode = self._select(config.policy, cache, tokens)
            kept = sum(int(k.sum()) for k in self.decode.keep) / (
                tokens * self.decode.keep[0].shape[0] * self.num_layers)
            generated = [first]
            while len(generated) < sample.max_tokens and generated[-1] not in self.ends:
                step = self.model(torch.tensor([[generated[-1]]]), past_key_values=cache,
                                  use_cache=True)
                generated.append(int(step.logits[0, -1].argmax()))
            if cache.get_seq_length() > tokens:  # back to the prompt for the next one
                cache.crop(tokens - cache.get_seq_length())
            results.append((self.tokenizer.decode(generated, skip_special_tokens=True), kept))
        self.decode = None
        return results

    def _select(self, policy: Policy | None, cache, tokens: int) -> _Decode:
        """The keep-masks the serving path would leave after prefill (compressor._compress)."""
        heads = cache.layers[0].keys.shape[1]
        if policy is None:
            return _Decode(None, (tokens,) * self.num_layers,
                           [torch.ones(heads, tokens, dtype=torch.bool)] * self.num_layers)
        plan = plan_layers(policy, tokens, self.num_layers)
        window = min(policy.window, tokens)
        keep, chosen = [], {}
        for layer in range(self.num_layers):
            budget = plan.kept[layer]
            source = policy.selection_source(layer)
            if budget >= tokens:
                mask = torch.ones(heads, tokens, dtype=torch.bool)
            elif source != layer and source in chosen:
                mask = chosen[source]
            else:
                mask = policy.select(LayerInputs(
                    keys=cache.layers[layer].keys[0], values=cache.layers[layer].values[0],
                    window_queries=self.queries[layer][:, -window:], layer=layer,
                    num_layers=self.num_layers, scale=self.scale,
                    attention_mass=self.mass.get(layer)), budget)
            chosen[layer] = mask
            keep.append(mask)
        mass = [self.mass[i] for i in range(self.num_layers)] if policy.needs_attention_mass else []
        return _Decode(policy, plan.cap, keep, mass)


def run(configs: list[Config], tasks, contexts, samples_per_task: int, held_out: bool, out: Path,
        command: str, model_path: str | None = None) -> dict:
    from benchmarks.tuning import held_out_samples
    from vllm_kvcompress.models import default_model_path

    lab = Lab(model_path or str(default_model_path()))
    configs = [Config("full", None), *configs]
    if held_out:
        samples = held_out_samples(lab.tokenizer, tasks, contexts, samples_per_task)
    else:
        depths = [(i + 0.5) / samples_per_task for i in range(samples_per_task)]
        samples = [s for ctx in contexts for t in tasks
                   for s in TASKS[t](lab.tokenizer, ctx, depths=depths)]
    result = {"command": command, "machine": machine(), "engine": "transformers",
              "context_tokens": list(contexts), "tasks": list(tasks),
              "samples_per_task": samples_per_task, "held_out": held_out,
              "configs": {c.name: {"per_sample": []} for c in configs}}
    for sample in tqdm(samples, desc="prompts"):
        for config, (text, kept) in zip(configs, lab.run_prompt(sample, configs)):
            result["configs"][config.name]["per_sample"].append({
                "task": sample.task, "context_tokens": sample.context_tokens,
                "depth": sample.depth, "correct": score(sample, text), "kept": kept})
        summarize(result)
        save(result, out)
    return result


def summarize(result: dict) -> None:
    """Each configuration's totals, per context, and relative to the full cache."""
    full = None
    for name, r in result["configs"].items():
        rows = r["per_sample"]
        r["correct"] = sum(s["correct"] for s in rows)
        r["kept"] = sum(s["kept"] for s in rows) / max(len(rows), 1)
        r["per_context"] = {str(ctx): sum(s["correct"] for s in rows if s["context_tokens"] == ctx)
                            for ctx in result["context_tokens"]}
        r["per_task"] = {t: sum(s["correct"] for s in rows if s["task"] == t)
                         for t in result["tasks"]}
        full = full or r
        r["relative"] = r["correct"] / full["correct"] if full["correct"] else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", required=True, type=_config,
                        help="policy@budget[:key=value,...], e.g. snapkv@0.25:kernel_size=21")
    parser.add_argument("--tasks", nargs="+", default=["multivalue", "vartrack", "commonwords"],
                        choices=list(TASKS))
    parser.add_argument("--contexts", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument("--samples", type=int, default=4, help="samples per task and context")
    parser.add_argument("--held-out", action="store_true",
                        help="benchmarks.tuning's prompts instead of the accuracy grid's")
    parser.add_argument("--out", type=Path, default=Path("results/lab.json"))
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    result = run(args.configs, args.tasks, args.contexts, args.samples, args.held_out, args.out,
                 shlex.join(["python", "-m", "benchmarks.lab", *argv]))
    for name, r in result["configs"].items():
        rel = "" if r["relative"] is None else f"{100 * r['relative']:5.1f}% of full"
        print(f"{name:40} {r['correct']:6.2f}  kept {r['kept']:.3f}  {rel}  {r['per_task']}")
    return result


def _config(text: str) -> Config:
    try:
        return parse_config(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


if __name__ == "__main__":
    main()
