"""One session's state in memory, stage by stage, so what-if steps are cheap.

The headless pipeline (`pipeline.run`) and the TUI both drive a `Workbench`: it loads the model and
calibration data, runs (or reuses) the importance pass, allocates, prunes a copy, evaluates,
diagnoses and writes the results folder. Each expensive stage is cached under `state/` by a hash of
exactly its inputs (see `cache.py`), and every step reports progress as events — never by printing.
"""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from prune_core import atomic
from prune_core.adapters import Adapter, get_adapter
from prune_core.cache import StageCache, stage_key
from prune_core.errors import BadInput, Interrupted
from prune_core.events import Event, EventSink, Notice, StageDone, StageStarted, null_sink
from prune_core.provenance import base_provenance, device_name, now_iso
from sessions import Session, check_against_model
from sessions.errors import SessionError

IMPORTANCE_KEYS = ("model", "data", "importance")  # sections whose change invalidates the importance pass


def results_dir_for(session: Session, out: Path | None = None) -> Path:
    """Where a session's results go: `--out DIR`, or `<output_dir>/<name>/`."""
    return Path(out) if out is not None else Path(session.session.output_dir) / session.session.name


class Workbench:
    """Holds a session's model, importance scores and allocation; each method is one pipeline stage."""

    def __init__(
        self,
        session: Session,
        results_dir: Path,
        *,
        on_event: EventSink = null_sink,
        should_stop: Callable[[], bool] | None = None,
        fresh: bool = False,
        keep_original: bool = True,
    ) -> None:
        self.session = session
        self.results_dir = Path(results_dir)
        self.state = StageCache(self.results_dir / "state")
        self.on_event = on_event
        self.should_stop = should_stop or (lambda: False)
        self.fresh = fresh
        self.keep_original = keep_original
        self.loaded: Any = None
        self.adapter: Adapter | None = None
        self.costs: Any = None
        self.calibration: torch.Tensor | None = None
        self.data_fingerprint = ""
        self.importance: Any = None
        self.importance_key = ""
        self.block: Any = None
        self.allocation: Any = None
        self.previous_allocation: Any = None
        self.findings: list[Any] = []
        self.metrics: dict[str, Any] = {}
        self.perplexity: dict[str, Any] = {}
        self.surgery: Any = None
        self._pruned_model: Any = None
        self._pruned_mask = ""
        self.total_parameters = 0
        self.timings: dict[str, float] = {}
        self.cached: dict[str, bool] = {}
        self.started = now_iso()

    # ---------------------------------------------------------------- helpers
    @contextmanager
    def _stage(self, name: str, description: str, total: int | None = None) -> Iterator[dict[str, Any]]:
        info: dict[str, Any] = {"cached": False, "summary": ""}
        if self.should_stop():
            raise Interrupted(f"stopped before stage {name!r}", "run the same command again to resume")
        self.on_event(StageStarted(stage=name, description=description, total=total))
        t0 = time.perf_counter()
        yield info
        seconds = time.perf_counter() - t0
        self.timings[name] = self.timings.get(name, 0.0) + seconds
        self.cached[name] = bool(info["cached"])
        self.on_event(StageDone(stage=name, seconds=seconds, cached=bool(info["cached"]), summary=info["summary"]))

    def _inner_sink(self, stage: str) -> EventSink:
        """Forward an inner step's events, except its own start/finish (the workbench reports those)."""

        def sink(event: Event) -> None:
            if isinstance(event, StageStarted | StageDone) and event.stage == stage:
                return
            self.on_event(event)

        return sink

    def _notice(self, message: str, stage: str = "") -> None:
        self.on_event(Notice(message=message, stage=stage))

    @property
    def model(self) -> Any:
        if self.loaded is None:
            raise RuntimeError("prepare() has not run")
        return self.loaded.model

    def importance_identity(self) -> dict[str, Any]:
        s = self.session
        return {
            "model": s.model.id,
            "revision": s.model.revision,
            "dtype": s.model.dtype,
            "model_fingerprint": self.loaded.fingerprint if self.loaded else "",
            "dataset": s.data.dataset,
            "data_fingerprint": self.data_fingerprint,
            "num_samples": s.data.num_samples,
            "seq_len": s.data.seq_len,
            "seed": s.session.seed,
            "batch_size": s.data.batch_size,
            "method": s.importance.method,
            "aggregation": s.importance.aggregation,
            "fisher_scale": s.importance.fisher_scale,
        }

    # ---------------------------------------------------------------- stages
    def prepare(self) -> None:
        """Load the model and the calibration tokens (nothing is written before both succeed)."""
        from prune_core.data import calibration_tokens, token_fingerprint
        from prune_core.models import resolve_model

        s = self.session
        if self.loaded is None:
            with self._stage("model", f"load {s.model.id}") as info:
                self.loaded = resolve_model(
                    s.model.id, revision=s.model.revision, dtype=s.model.dtype, device=s.model.device,
                    trust_remote_code=s.model.trust_remote_code, on_event=self.on_event,
                )
                self.adapter = get_adapter(self.loaded.model)
                self.total_parameters = sum(p.numel() for p in self.loaded.model.parameters())
                problems = check_against_model(s, self.adapter.num_layers(self.loaded.model))
                if problems:
                    raise SessionError(problems, source="session")
                from prune_core.allocation import GroupCosts

                self.costs = GroupCosts.from_model(self.loaded.model, self.adapter)
                d = self.adapter.describe(self.loaded.model)
                info["summary"] = (f"{d['family']}, {d['layers']} layers, {d['heads']} heads / {d['kv_heads']} KV, "
                                   f"{d['prunable_parameters']:,} prunable parameters")
        if self.calibration is None:
            with self._stage("data", f"calibration windows from {s.data.dataset}") as info:
                self.calibration = calibration_tokens(
                    self.loaded.tokenizer, s.data.dataset, s.data.num_samples, s.data.seq_len, s.session.seed,
                    on_event=self.on_event,
                )
                self.data_fingerprint = token_fingerprint(self.calibration)
                info["summary"] = f"{s.data.num_samples} × {s.data.seq_len} tokens, sha256 {self.data_fingerprint[:12]}…"
            tokens_path = self.state.root / "calibration_tokens.safetensors"
            atomic.write_with(tokens_path, lambda p: save_file(
                {"input_ids": self.calibration.contiguous()}, str(p),
                metadata={"sha256": self.data_fingerprint, "dataset": s.data.dataset, "seed": str(s.session.seed)},
            ))

    def has_checkpoint(self) -> bool:
        """An interrupted importance pass of this results folder can be resumed."""
        root = self.state.root / "checkpoints"
        return root.is_dir() and any(p.name.startswith("importance-") for p in root.iterdir())

    def compute_importance(self) -> Any:
        """Run the importance pass, or reuse the cached result for exactly these inputs."""
        from prune_core.importance import ImportanceResult, run_importance

        self.prepare()
        s = self.session
        identity = self.importance_identity()
        key = stage_key(identity)
        folder = self.state.folder("importance", key)
        ckpt = self.state.checkpoint_dir("importance", key)
        if self.fresh:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(ckpt, ignore_errors=True)
        if self.importance is not None and self.importance_key == key:
            return self.importance
        if self.state.has_folder("importance", key):
            with self._stage("importance", f"{s.importance.method} pass") as info:
                self.importance = ImportanceResult.load(folder)
                info["cached"] = True
                info["summary"] = f"reused cached {s.importance.method} scores ({key})"
        else:
            # the engine reports its own stage start/finish and every batch
            t0 = time.perf_counter()
            self.importance = run_importance(
                self.model, self.adapter, self.calibration,
                method=s.importance.method, aggregation=s.importance.aggregation,
                fisher_scale=s.importance.fisher_scale, batch_size=s.data.batch_size,
                hessian_device=s.importance.hessian_device,
                gradient_checkpointing=s.importance.gradient_checkpointing,
                checkpoint_dir=ckpt, checkpoint_seconds=s.importance.checkpoint_seconds,
                identity=identity, on_event=self.on_event, should_stop=self.should_stop,
            )
            self.importance.save(folder)
            self.state.mark_complete("importance", key, identity)
            shutil.rmtree(ckpt, ignore_errors=True)
            self.timings["importance"] = self.timings.get("importance", 0.0) + time.perf_counter() - t0
            self.cached["importance"] = False
        self.importance_key = key
        return self.importance

    def _needs_block(self, session: Session) -> bool:
        return session.correction.temperature != 0.0 or session.correction.tau != 0.0

    def ensure_block_importance(self, session: Session | None = None) -> Any:
        """Block/layer loss increases, computed once (and cached) when T or tau is non-zero."""
        from prune_core.data import calibration_tokens, token_fingerprint
        from prune_core.importance import BlockImportance, block_importance

        s = session or self.session
        if not self._needs_block(s):
            return None
        self.prepare()
        tokens = calibration_tokens(self.loaded.tokenizer, s.data.dataset, s.correction.samples,
                                    s.correction.seq_len, s.session.seed)
        identity = {"model_fingerprint": self.loaded.fingerprint, "dtype": s.model.dtype,
                    "tokens": token_fingerprint(tokens)}
        key = stage_key(identity)
        if self.block is not None and getattr(self, "_block_key", "") == key:
            return self.block
        with self._stage("block_importance", "loss increase per skipped block and layer",
                         total=self.adapter.num_layers(self.model)) as info:
            cached = None if self.fresh else self.state.read_json("block_importance", key)
            if cached is not None:
                self.block = BlockImportance.from_dict(cached["block"])
                info["cached"] = True
                info["summary"] = "reused cached block losses"
            else:
                self.block = block_importance(self.model, self.adapter, tokens,
                                              batch_size=min(s.data.batch_size, len(tokens)),
                                              on_event=self._inner_sink("block_importance"),
                                              should_stop=self.should_stop)
                self.state.write_json("block_importance", key, {"inputs": identity, "block": self.block.to_dict()})
                info["summary"] = f"base loss {self.block.base_loss:.4f}"
        self._block_key = key
        return self.block

    def allocate(self, session: Session | None = None) -> Any:
        """Correction, normalization and the global selection: the cheap what-if step."""
        from prune_core.allocation import allocate

        if session is not None:
            changed = [k for k in IMPORTANCE_KEYS
                       if getattr(session, k).model_dump() != getattr(self.session, k).model_dump()]
            self.session = session
            if changed and self.importance is not None:
                self._notice(f"[{', '.join(changed)}] changed: the importance pass runs again", "allocation")
                self.importance = None
                if "model" in changed or "data" in changed:
                    self.loaded = None if "model" in changed else self.loaded
                    self.calibration = None
        s = self.session
        self.compute_importance()
        block = self.ensure_block_importance(s)
        with self._stage("allocation", "correction, normalization and global selection") as info:
            new = allocate(self.importance, self.costs, s, block=block)
            if self.allocation is not None:
                self.previous_allocation = self.allocation
            self.allocation = new
            info["summary"] = f"{new.achieved_ratio:.1%} of prunable parameters removed"
            if not new.reachable:
                self._notice(new.message, "allocation")
        return self.allocation

    def diagnose(self) -> list[Any]:
        from prune_core.diagnosis import diagnose

        if self.allocation is None:
            self.allocate()
        with self._stage("diagnosis", "extreme-pruning diagnosis") as info:
            self.findings = diagnose(
                stats=self.importance.stats, stats_label=self.importance.stats_label,
                summary=self.allocation.summary, session=self.session,
                second_order_share=self.second_order_share(),
            )
            worst = self.findings[0].severity if self.findings else "none"
            info["summary"] = f"{len(self.findings)} findings (worst: {worst})"
        return self.findings

    def second_order_share(self) -> float | None:
        fo = getattr(self.importance, "first_order", None)
        if not fo:
            return None
        total = float(self.importance.attention.sum() + self.importance.mlp.sum())
        first = float(fo["attention"].sum() + fo["mlp"].sum())
        return (total - first) / total if total > 0 else 0.0

    def pruned_model(self) -> Any:
        """The model with the current allocation physically removed (a copy unless keep_original is off)."""
        from prune_core.surgery import apply_pruning

        if self.allocation is None:
            self.allocate()
        mask = self.allocation.mask_sha256 + self.session.pruning.compensate
        if self._pruned_model is not None and self._pruned_mask == mask:
            return self._pruned_model
        with self._stage("surgery", "remove pruned heads and channels") as info:
            model = copy.deepcopy(self.model) if self.keep_original else self.model
            means = None
            if self.session.pruning.compensate == "bias":
                n = max(int(self.importance.input_tokens), 1)
                means = {k: v / n for k, v in self.importance.input_sums.items()}
            self.surgery = apply_pruning(model, self.adapter, self.allocation.pruned_indices(), input_means=means)
            self._pruned_model, self._pruned_mask = model, mask
            info["summary"] = f"{self.surgery.params_before:,} → {self.surgery.params_after:,} parameters"
        return model

    def _eval_tokens(self) -> torch.Tensor:
        from prune_core.data import evaluation_tokens

        s = self.session
        if getattr(self, "_eval_cache", None) is None:
            self._eval_cache = evaluation_tokens(self.loaded.tokenizer, s.eval_dataset, s.evaluation.max_tokens,
                                                 on_event=self.on_event)
        return self._eval_cache

    def _ppl(self, which: str, model: Any, extra_key: str) -> dict[str, Any]:
        from prune_core.data import token_fingerprint
        from prune_core.evaluate import perplexity

        s = self.session
        tokens = self._eval_tokens()
        inputs = {"model_fingerprint": self.loaded.fingerprint, "tokens": token_fingerprint(tokens),
                  "seq_len": s.evaluation.seq_len, "which": which, "extra": extra_key}
        key = stage_key(inputs)
        stage = f"eval_{which}"
        with self._stage(stage, f"perplexity {which} pruning") as info:
            cached = None if self.fresh else self.state.read_json("perplexity", key)
            if cached is not None:
                result = cached["result"]
                info["cached"] = True
            else:
                result = perplexity(model, tokens, seq_len=s.evaluation.seq_len, on_event=self.on_event,
                                    should_stop=self.should_stop, stage=stage)
                result = {**result, "dataset": s.eval_dataset, "max_tokens": s.evaluation.max_tokens}
                self.state.write_json("perplexity", key, {"inputs": inputs, "result": result})
            info["summary"] = f"PPL {result['ppl']:.3f} ({result['tokens']:,} tokens, seq_len {result['seq_len']})"
        self.perplexity[which] = result
        return result

    def evaluate(self, before: bool | None = None, after: bool | None = None) -> dict[str, Any]:
        """Perplexity before and/or after pruning (each cached by its inputs)."""
        self.prepare()
        s = self.session
        if s.evaluation.before if before is None else before:
            self._ppl("before", self.model, "")
        if s.evaluation.after if after is None else after:
            model = self.pruned_model()
            self._ppl("after", model, self.allocation.mask_sha256 + s.pruning.compensate)
        return self.perplexity

    def generate_sample(self, prompt: str, max_new_tokens: int = 40) -> tuple[str, str]:
        """Greedy continuations of `prompt` from the original and the pruned model."""
        self.prepare()
        tok = self.loaded.tokenizer
        pruned = self.pruned_model()
        out = []
        for model in (self.model, pruned):
            ids = tok(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
            with torch.no_grad():
                gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id or tok.eos_token_id)
            out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
        return out[0], out[1]

    def save_model(self, folder: Path | None = None) -> Path:
        from prune_core.export import save_pruned

        model = self.pruned_model()
        target = Path(folder) if folder else self.results_dir / "model"
        with self._stage("save_model", f"save pruned model to {target}") as info:
            save_pruned(model, self.loaded.tokenizer, target, kept=self.surgery.kept,
                        source={"id": self.session.model.id, "revision": self.session.model.revision,
                                "fingerprint": self.loaded.fingerprint},
                        session=self.session.resolved().to_dict())
            info["summary"] = str(target)
        return target

    # ---------------------------------------------------------------- results
    def build_metrics(self) -> dict[str, Any]:
        total_before = self.total_parameters
        alloc = self.allocation
        removed = int(alloc.removed_parameters)
        metrics: dict[str, Any] = {
            "session": self.session.session.name,
            "parameters": {
                "total_before": total_before,
                "total_after": total_before - removed,
                "prunable_before": int(alloc.prunable_parameters),
                "prunable_after": int(alloc.prunable_parameters) - removed,
                "removed": removed,
            },
            "ratio": {"target": alloc.target_ratio, "achieved": alloc.achieved_ratio,
                      "reachable": bool(alloc.reachable), "message": alloc.message},
            "perplexity": self.perplexity,
            "mask_sha256": alloc.mask_sha256,
            "importance": {"method": self.importance.method, "batches": self.importance.batches,
                           "tokens": self.importance.tokens, "stats_label": self.importance.stats_label,
                           "cache_key": self.importance_key},
            "stage_seconds": {k: round(v, 4) for k, v in self.timings.items()},
            "stages_cached": sorted(k for k, v in self.cached.items() if v),
            "findings": {sev: sum(1 for f in self.findings if f.severity == sev)
                         for sev in ("critical", "high", "warning", "info")},
        }
        if self.surgery is not None:
            metrics["parameters"]["total_after_surgery"] = int(self.surgery.params_after)
        self.metrics = metrics
        return metrics

    def provenance(self) -> dict[str, Any]:
        prov = base_provenance()
        device = next(self.model.parameters()).device
        prov.update({
            "device": device_name(device),
            "dtype": self.session.model.dtype,
            "model_id": self.session.model.id,
            "model_revision": self.loaded.revision or self.session.model.revision,
            "model_source": str(self.loaded.source),
            "model_fingerprint": self.loaded.fingerprint,
            "data_fingerprint": self.data_fingerprint,
            "started": self.started,
            "finished": now_iso(),
        })
        return prov

    def save_results(self) -> Path:
        """Write session.toml (+provenance), metrics.json, analysis/ and visualization/ atomically."""
        from prune_core import results

        if self.allocation is None:
            self.allocate()
        with self._stage("save", f"write results to {self.results_dir}") as info:
            metrics = self.build_metrics()
            results.write_results(self, metrics)
            info["summary"] = str(self.results_dir)
        return self.results_dir

    def run_all(self) -> dict[str, Any]:
        """The whole pipeline, as `prune run` does it."""
        s = self.session
        self.prepare()
        self.compute_importance()
        self.allocate()
        if s.evaluation.before:
            self.evaluate(before=True, after=False)
        self.pruned_model()
        if s.evaluation.after:
            self.evaluate(before=False, after=True)
        self.diagnose()
        if s.output.save_model:
            self.save_model()
        self.save_results()
        return self.metrics


def check_resumable(results_dir: Path) -> bool:
    root = Path(results_dir) / "state" / "checkpoints"
    return root.is_dir() and any(p.name.startswith("importance-") for p in root.iterdir())


def ensure_writable(results_dir: Path) -> None:
    if results_dir.exists() and not results_dir.is_dir():
        raise BadInput(f"results path {str(results_dir)!r} is a file", "choose another --out folder or session name")
