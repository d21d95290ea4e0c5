"""One prepared GPU run: attention, precision, blocked and generation, side by side, in one process.

Made for a short loan of a GPU (issue 19): one invocation, a global time
budget, every section and every measurement in its own ``try``, and the
results rewritten after each measurement, so a run that is killed or runs out
of time still leaves its figures. Writes ``gpu_suite.json`` and
``gpu_suite.md`` (tables ready to paste into benchmarks/RESULTS.md, between
``<!-- gpu_suite:begin/end -->`` markers) under ``--out``.

    python benchmarks/gpu_suite.py --device cuda --out /tmp/gpu     # the device run (about 7 minutes)
    python benchmarks/gpu_suite.py --smoke --out /tmp/smoke          # CPU, tiny sizes (what the test runs)
    python benchmarks/gpu_suite.py --device cuda --sections attention,generation --total-seconds 300

Sections (bf16; transformers models from configs with random weights, never a download):

* ``attention``: the Llama (8 layers, hidden 2048, 32 heads / 8 KV heads) at batch 1,
  T8192 and T2048, GPT-2 124M at batch 4, T1024 and T4096: eager attention, sdpa,
  ``torch.compile`` of each, ``graphopt.optimize`` of the eager model and that
  result under ``torch.compile``. Median time (CUDA events) after warm-up, peak
  memory above the baseline, relative L2 against eager, compile and optimize times.
* ``precision``: the Llama LM (batch 1, T2048) from fp32: fp32 eager, bf16 eager,
  graphopt ``precision="bf16"``, ``"fp8"``, ``"auto"``; rel L2 and top-1 of the
  logits against fp32, time.
* ``blocked``: ``memory_budget`` = 25% of eager's measured peak on the Llama at T8192:
  predicted and measured peak (allocated and reserved), time vs eager and sdpa.
* ``generation``: ``model.generate`` on the Llama LM, batch 1 and 8, prompt 128,
  128 new tokens, greedy: eager + dynamic cache, sdpa + static cache, sdpa +
  static cache + compile (on a GPU transformers' own: ``generate`` compiles the decode step); prefill ms
  and decode tokens/s. graphopt's own generate when it has one.

Each section has a share of ``--total-seconds``; time a section leaves unused
passes to the next, and a section that reaches its deadline is interrupted
(the measurement under way is recorded as interrupted, the rest as
``skipped: time budget``).

The script runs from a checkout without graphopt installed: when
``graphopt.passes`` cannot be imported it puts the repository root on
``sys.path`` and maps ``graphopt.passes`` to the top-level ``passes/`` folder
(what pyproject's package-dir does for an install). The graphopt commit
comes from ``git rev-parse HEAD``, or ``$GRAPHOPT_COMMIT`` for a copy without
``.git``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _PassesFinder(importlib.abc.MetaPathFinder):
    """Finds ``graphopt.passes`` in ``<root>/passes`` (its subpackages then follow its ``__path__``)."""

    def __init__(self, root: str) -> None:
        self.dir = os.path.join(root, "passes")

    def find_spec(self, name, path, target=None):  # noqa: ANN001 - the MetaPathFinder protocol
        if name != "graphopt.passes":
            return None
        return importlib.util.spec_from_file_location(name, os.path.join(self.dir, "__init__.py"),
                                                      submodule_search_locations=[self.dir])


def bootstrap_graphopt(root: str = ROOT) -> str:
    """Make ``import graphopt`` and ``import graphopt.passes`` work from a checkout; says how."""
    try:
        import graphopt.passes  # noqa: F401

        return "installed"
    except ImportError:
        pass
    for name in [m for m in sys.modules if m == "graphopt" or m.startswith("graphopt.")]:
        del sys.modules[name]  # a half-imported package from the failed attempt
    if root not in sys.path:
        sys.path.insert(0, root)
    if not any(isinstance(f, _PassesFinder) for f in sys.meta_path):
        sys.meta_path.append(_PassesFinder(root))
    import graphopt.passes  # noqa: F401,F811

    return f"bootstrapped from {root}"


GRAPHOPT_IMPORT = bootstrap_graphopt()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the other benchmarks, imported as modules

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

import graphopt  # noqa: E402
from results_file import markers  # noqa: E402

SECTIONS = ("attention", "precision", "blocked", "generation")
#: each section's share of --total-seconds (unused time passes to the next section)
SHARES = {"attention": 0.45, "precision": 0.15, "blocked": 0.13, "generation": 0.25}

# (model, seq, batch), most important first: the issue's targets are on the Llama at T8192 and T2048
CUDA_ATTENTION = [("llama", 8192, 1), ("llama", 2048, 1), ("gpt2", 1024, 4), ("gpt2", 4096, 4)]
TINY_ATTENTION = [("llama", 64, 1), ("gpt2", 32, 2)]
MODEL_SIZES = {
    "gpt2": dict(layers=12, hidden=768, heads=12, kv_heads=12),
    "llama": dict(layers=8, hidden=2048, heads=32, kv_heads=8),
}
TINY_SIZES = {
    "gpt2": dict(layers=2, hidden=64, heads=4, kv_heads=4),
    "llama": dict(layers=2, hidden=64, heads=4, kv_heads=2),
}

#: the peers' figures from issue 19 (H100, bf16): ms and GB per (model, seq)
PEERS_H100 = {
    ("gpt2", 1024): {"eager": (13.6, None), "sdpa": (8.8, None), "compile(eager)": (6.2, None)},
    ("gpt2", 4096): {"eager": (120.9, 3.35), "sdpa": (30.8, 1.59), "compile(eager)": (56.0, 1.75)},
    ("llama", 2048): {"eager": (22.1, 1.34), "sdpa": (11.2, 0.13), "compile(eager)": (8.9, 0.34),
                      "compile(sdpa)": (5.1, None)},
    ("llama", 8192): {"eager": (285.7, 20.8), "sdpa": (24.4, 0.53), "compile(eager)": (91.4, 4.4),
                      "compile(sdpa)": (31.7, None)},
}


class TimeBudget(BaseException):
    """Raised by the alarm when a section reaches its deadline (a BaseException, so no library's
    ``except Exception`` swallows it)."""


def _alarm(_signum, _frame):
    raise TimeBudget()


# ---------------------------------------------------------------- the run: budget, records, files

class Suite:
    """Holds the results, the time budget and the output files; every ``save`` rewrites both files."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.start = time.monotonic()
        self.device = args.device
        self.cuda = args.device.startswith("cuda")
        self.dtype = getattr(torch, args.dtype)
        self.tiny = args.tiny
        self.compile_estimate = 45.0 if self.cuda else 20.0
        self.data: dict[str, Any] = {"suite": "benchmarks/gpu_suite.py", "args": vars(args), "env": {},
                                     "sections": {}, "elapsed_s": 0.0, "finished": False}
        self.section: dict[str, Any] = {}
        self.deadline = math.inf
        os.makedirs(args.out, exist_ok=True)
        self.json_path = os.path.join(args.out, "gpu_suite.json")
        self.md_path = os.path.join(args.out, "gpu_suite.md")

    # time
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        """Seconds left to the current section (its deadline, within the total)."""
        return min(self.deadline, self.start + self.args.total_seconds) - time.monotonic()

    def need(self, seconds: float, where: dict[str, Any], what: str) -> bool:
        """False (and ``where[what]`` says so) when the section has less than ``seconds`` left."""
        if self.left() >= seconds:
            return True
        skipped = {"status": "skipped: time budget", "needed_s": round(seconds, 1),
                   "left_s": round(max(self.left(), 0.0), 1)}
        if what == "status":  # a whole case: its status line, the figures beside it
            where.update(status=skipped["status"], needed_s=skipped["needed_s"], left_s=skipped["left_s"])
        else:
            where[what] = skipped
        self.log(f"  {what}: skipped: time budget (needs ~{seconds:.0f} s, {max(self.left(), 0):.0f} s left)")
        self.save()
        return False

    # output
    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        for path, text in ((self.json_path, json.dumps(self.data, indent=2, default=_jsonable)),
                           (self.md_path, render_markdown(self.data))):
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, path)

    # device helpers
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def cleanup(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def compile(self, fn: Any, **kw: Any) -> Any:
        """``torch.compile`` with ``--compile-backend`` (a mode only for inductor, which alone has modes)."""
        if self.args.compile_backend != "inductor":
            kw.pop("mode", None)
        return torch.compile(fn, backend=self.args.compile_backend, **kw)


def _jsonable(x: Any) -> Any:
    if isinstance(x, (torch.dtype, torch.device)):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return repr(x)


def _error(exc: BaseException) -> dict[str, Any]:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"status": "error", "error": f"{type(exc).__name__}: {str(exc).strip()[:2000]}",
            "traceback_tail": "".join(tb)[-3000:]}


def environment(device: str) -> dict[str, Any]:
    """The card, driver, CUDA, torch, transformers and graphopt commit the figures came from."""
    import transformers

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "torch_cuda": torch.version.cuda,
                           "graphopt_import": GRAPHOPT_IMPORT, "graphopt_path": os.path.dirname(graphopt.__file__),
                           "host_cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                           "torch_threads": torch.get_num_threads()}
    try:
        if os.environ.get("GRAPHOPT_COMMIT"):  # a copy without .git: the caller names the commit
            raise OSError("named by GRAPHOPT_COMMIT")
        env["graphopt_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                                text=True, timeout=10).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
        if env["graphopt_commit"] != "unknown" and dirty.returncode == 0 and dirty.stdout.strip():
            env["graphopt_commit"] += " (with uncommitted changes)"
    except (OSError, subprocess.SubprocessError):
        env["graphopt_commit"] = os.environ.get("GRAPHOPT_COMMIT") or "unknown"
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   compute_capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   cudnn=torch.backends.cudnn.version())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()[:300]
            env["driver"] = smi.stdout.split(",")[1].strip() if smi.returncode == 0 and "," in smi.stdout else None
        except (OSError, subprocess.SubprocessError) as exc:
            env["nvidia_smi"] = f"unavailable: {exc}"
        if not env.get("driver"):
            try:  # torch's own view: the driver's CUDA version, from cudaDriverGetVersion
                v = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
                env["driver"] = f"CUDA driver API {v}" if v else "unknown"
            except Exception:  # noqa: BLE001
                env["driver"] = "unknown"
    else:
        from results_file import cpu_description

        env["cpu"] = cpu_description()
    return env


# ---------------------------------------------------------------- measuring

def time_ms(suite: Suite, fn: Callable[[], Any], runs: int | None = None,
            warmup: int | None = None) -> dict[str, float]:
    """Median and fastest milliseconds per call after warm-up: CUDA events on a GPU, the wall clock on a CPU.

    The run count shrinks for slow calls so that one variant takes at most ~3 s of timing.
    """
    runs = runs or suite.args.runs
    warmup = suite.args.warmup if warmup is None else warmup
    for _ in range(warmup):
        fn()
    suite.sync()
    t0 = time.perf_counter()
    fn()
    suite.sync()
    once = time.perf_counter() - t0
    runs = max(3, min(runs, int(3.0 / max(once, 1e-6))))
    samples = []
    for _ in range(runs):
        if suite.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(samples), "min_ms": min(samples), "runs": runs}


def peak(suite: Suite, fn: Callable[[], Any]) -> dict[str, Any]:
    """Peak bytes one call allocates above the baseline (attention.peak_memory), and on CUDA the
    allocator's reserved peak above the reserved baseline."""
    from attention import peak_memory

    if not suite.cuda:
        return {"peak_bytes": peak_memory(fn, suite.device)}
    suite.cleanup()
    reserved0 = torch.cuda.memory_reserved()
    allocated = peak_memory(fn, suite.device)  # resets the peak stats, then max_memory_allocated - base
    return {"peak_bytes": allocated, "peak_reserved_bytes": torch.cuda.max_memory_reserved() - reserved0}


def first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key) and getattr(out, key) is not None:
            return getattr(out, key)
    return out[0] if isinstance(out, (tuple, list)) else next(iter(out.values()))


def rel_l2(ref: torch.Tensor, out: torch.Tensor) -> float:
    from attention import rel_l2 as _rel

    return _rel(ref, out.to(ref.device))


def graphopt_summary(result: Any) -> dict[str, Any]:
    """What a reader needs from an OptimizeResult's report: sites fused, passes rolled back, numerics."""
    report = result.report
    info: dict[str, Any] = {"optimize_s": round(report.total_seconds, 2), "capture_s": round(report.capture_seconds, 2),
                            "capture_route": report.capture_route}
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    info["sdpa_nodes"] = sum(1 for n in result.module.graph.nodes if n.op == "call_function" and n.target == sdpa)
    info["passes"] = {r.name: r.status for r in report.passes}
    info["rolled_back"] = {r.name: (r.numerics.reason if r.numerics else r.error)
                           for r in report.passes if r.status == "rolled back"}
    info["declined"] = sorted({f"{r.name}: {d.reason}" for r in report.passes for d in r.declined})[:12]
    if report.final_numerics is not None:
        info["final_numerics"] = report.final_numerics.summary()
    return info


@contextlib.contextmanager
def step(suite: Suite, where: dict[str, Any], name: str):
    """One measurement: its errors are recorded in ``where[name]`` and do not stop the section."""
    suite.log(f"  {name} ...")
    try:
        yield
    except TimeBudget:
        where[name] = {"status": "interrupted: time budget"}
        suite.save()
        raise
    except Exception as exc:  # noqa: BLE001 - recorded, and the section goes on
        where[name] = _error(exc)
        suite.log(f"  {name}: {where[name]['error'][:300]}")
        if suite.cuda:
            suite.cleanup()
    else:
        row = where.get(name, {})
        suite.log(f"  {name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in row.items() if k in ("ms", "peak_bytes", "rel_l2",
                                                                             "compile_s", "optimize_s",
                                                                             "prefill_ms", "decode_tok_s")))
    suite.save()


def measure(suite: Suite, fn: Callable[[], Any], ref: torch.Tensor | None,
            compiled: bool = False) -> dict[str, Any]:
    """Time, peak memory and error against ``ref`` of one variant (``compiled``: its first call, the
    compilation, was made and timed already)."""
    with torch.no_grad():
        t0 = time.perf_counter()
        out = first_tensor(fn())
        suite.sync()
        row: dict[str, Any] = {}
        if not compiled:
            row["first_call_s"] = round(time.perf_counter() - t0, 2)
        if ref is not None:
            row["rel_l2"] = rel_l2(ref, out)
        del out
        row.update(time_ms(suite, fn))
        row.update(peak(suite, fn))
    return row


# ---------------------------------------------------------------- 1. attention

def attention_section(suite: Suite, sec: dict[str, Any]) -> None:
    cases = TINY_ATTENTION if suite.tiny else CUDA_ATTENTION
    if suite.args.attention_cases:
        cases = [(m, int(t), int(b)) for m, t, b in (c.split(":") for c in suite.args.attention_cases.split(","))]
    sizes = TINY_SIZES if suite.tiny else MODEL_SIZES
    sec["cases"] = []
    for model_name, seq, batch in cases:
        case: dict[str, Any] = {"model": model_name, "seq": seq, "batch": batch, **sizes[model_name], "rows": {}}
        sec["cases"].append(case)
        label = f"{model_name} T{seq} b{batch}"
        if not suite.need(10.0, case, "status"):
            continue
        suite.log(f"attention: {label}")
        rows = case["rows"]
        eager = sdpa = result = None
        try:
            size = dict(sizes[model_name], seq=seq)
            eager, sdpa, ids, ref = eager_and_sdpa(suite, rows, model_name, size, batch, seed=1)
            with step(suite, rows, "graphopt"):
                result = graphopt.optimize(eager, (ids,))
                case["graphopt"] = graphopt_summary(result)
                gm = result.module
                rows["graphopt"] = {"optimize_s": case["graphopt"]["optimize_s"],
                                    **measure(suite, lambda: gm(ids), ref)}
            # the issue's targets first: compile(graphopt) vs min(sdpa, compile(sdpa)), then the peers' compile
            compiled_variants = [("compile(sdpa)", lambda: sdpa),
                                 ("compile(graphopt)", lambda: result.module if result is not None else None),
                                 ("compile(eager)", lambda: eager)]
            for name, target in compiled_variants:
                if not suite.need(suite.compile_estimate, rows, name):
                    continue
                with step(suite, rows, name):
                    mod = target()
                    if mod is None:
                        raise RuntimeError("graphopt.optimize failed above; nothing to compile")
                    compiled = suite.compile(mod, dynamic=False)
                    with torch.no_grad():
                        t0 = time.perf_counter()
                        compiled(ids)
                        suite.sync()
                        compile_s = time.perf_counter() - t0
                    suite.compile_estimate = max(suite.compile_estimate * 0.5, compile_s * 1.2)
                    rows[name] = {"compile_s": round(compile_s, 1),
                                  **measure(suite, lambda: compiled(ids), ref, compiled=True)}
            case["status"] = "done"
        except TimeBudget:
            case["status"] = "interrupted: time budget"
            raise
        except Exception as exc:  # noqa: BLE001
            case.update(_error(exc))
        finally:
            del eager, sdpa, result
            suite.cleanup()
            torch._dynamo.reset()
            suite.save()


# ---------------------------------------------------------------- 2. precision

def llama_lm(suite: Suite, seq: int, dtype: torch.dtype, impl: str = "eager", use_cache: bool = False,
             vocab: int | None = None) -> torch.nn.Module:
    import transformers

    s = TINY_SIZES["llama"] if suite.tiny else MODEL_SIZES["llama"]
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=s["layers"], hidden_size=s["hidden"],
                                   num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                                   intermediate_size=int(s["hidden"] * 2.75),
                                   vocab_size=vocab or (512 if suite.tiny else 32000),
                                   max_position_embeddings=max(2048, seq), use_cache=use_cache)
    cfg._attn_implementation = impl
    return transformers.LlamaForCausalLM(cfg).to(device=suite.device, dtype=dtype).eval()


def precision_section(suite: Suite, sec: dict[str, Any]) -> None:
    from precision import errors

    seq = 64 if suite.tiny else suite.args.precision_seq
    sec.update(model="LlamaForCausalLM", seq=seq, batch=1, rows={})
    rows = sec["rows"]
    suite.log(f"precision: Llama LM T{seq}, from fp32")
    model = llama_lm(suite, seq, torch.float32)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(2)
    example = torch.randint(0, vocab, (1, seq), generator=g).to(suite.device)
    fresh = torch.randint(0, vocab, (1, seq), generator=g).to(suite.device)
    with torch.no_grad():
        ref = first_tensor(model(fresh)).detach().float()

    def row_for(fn: Callable[[], Any]) -> dict[str, Any]:
        with torch.no_grad():
            out = first_tensor(fn()).float()
        rel, top1 = errors(ref, out, True)
        del out
        return {"rel_l2": rel, "top1": top1, **time_ms(suite, fn), **peak(suite, fn)}

    with step(suite, rows, "fp32 eager"):
        rows["fp32 eager"] = row_for(lambda: model(fresh))
    with step(suite, rows, "bf16 eager"):
        half = copy.deepcopy(model).to(torch.bfloat16)
        rows["bf16 eager"] = row_for(lambda: half(fresh))
        del half
        suite.cleanup()
    budget = graphopt.ErrorBudget(rel_l2=suite.args.error_budget, top1=0.9)
    for mode in ("bf16", "fp8", "auto"):
        name = f"graphopt {mode}"
        if not suite.need(15.0, rows, name):
            continue
        with step(suite, rows, name):
            result = graphopt.optimize(model, (example,), precision=mode, error_budget=budget, n_random_inputs=1)
            info = graphopt_summary(result)
            rec = result.report.record("precision")
            counts: dict[str, int] = {}
            for e in result.report.extra.get("precision", []):
                counts[e["precision"]] = counts.get(e["precision"], 0) + 1
            plan = {"status": rec.status if rec else "missing", "nodes": counts,
                    "notes": [n[:300] for n in rec.notes][:8] if rec else []}
            if rec and rec.status != "applied":
                plan["reason"] = (rec.numerics.reason if rec.numerics and rec.numerics.reason else
                                  "; ".join(sorted({d.reason for d in rec.declined})) or rec.error or rec.status)
            gm = result.module
            rows[name] = {"optimize_s": info["optimize_s"], "plan": plan, **row_for(lambda: gm(fresh))}
            del result, gm
            suite.cleanup()


# ---------------------------------------------------------------- 3. blocked

def eager_and_sdpa(suite: Suite, rows: dict[str, Any], model_name: str, size: dict[str, Any], batch: int,
                   seed: int) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
    """The model with eager and with sdpa attention (same weights), token ids, eager's output; both measured."""
    from attention import build

    eager = build(model_name, size, "eager", suite.device, suite.dtype)
    sdpa = build(model_name, size, "sdpa", suite.device, suite.dtype, eager.state_dict())
    ids = torch.randint(0, 1024, (batch, size["seq"]), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(suite.device)
    with torch.no_grad():
        ref = first_tensor(eager(ids)).detach()
    with step(suite, rows, "eager"):
        rows["eager"] = measure(suite, lambda: eager(ids), None)
    with step(suite, rows, "sdpa"):
        rows["sdpa"] = measure(suite, lambda: sdpa(ids), ref)
    return eager, sdpa, ids, ref


def blocked_section(suite: Suite, sec: dict[str, Any]) -> None:
    from blocked import FRACTION

    seq = 128 if suite.tiny else suite.args.blocked_seq
    sizes = TINY_SIZES if suite.tiny else MODEL_SIZES
    size = dict(sizes["llama"], seq=seq)
    sec.update(model="LlamaModel", seq=seq, batch=1, fraction=FRACTION, rows={})
    rows = sec["rows"]
    suite.log(f"blocked: Llama T{seq}, budget {FRACTION:.0%} of eager's peak")
    eager, sdpa, ids, ref = eager_and_sdpa(suite, rows, "llama", size, 1, seed=3)
    eager_peak = rows.get("eager", {}).get("peak_bytes")
    if not eager_peak:
        sec["status"] = "no eager peak measured; blocked not run"
        return
    budget = int(eager_peak * FRACTION)
    sec["budget_bytes"] = budget
    if not suite.need(20.0, rows, "graphopt blocked"):
        return
    with step(suite, rows, "graphopt blocked"):
        try:
            result = graphopt.optimize(eager, (ids,), memory_budget=budget, n_random_inputs=1)
        except Exception as exc:  # noqa: BLE001
            if type(exc).__name__ == "BudgetError":  # graphopt.passes.blocked.BudgetError: no plan meets it
                rows["graphopt blocked"] = {"status": "BudgetError", "error": str(exc)[:1000]}
                return
            raise
        info = graphopt_summary(result)
        rec = result.report.record("blocked")
        gm = result.module
        rows["graphopt blocked"] = {
            "optimize_s": info["optimize_s"], "pass_status": rec.status if rec else "missing",
            "predicted_peak_bytes": result.report.extra.get("blocked", {}).get("predicted_peak_after"),
            "notes": [n[:300] for n in rec.notes][:8] if rec else [], "final_numerics": info.get("final_numerics"),
            **measure(suite, lambda: gm(ids), ref)}
        r = rows["graphopt blocked"]
        r["within_budget"] = r["peak_bytes"] <= budget
        r["vs_eager_time"] = r["ms"] / rows["eager"]["ms"]
        if "ms" in rows.get("sdpa", {}):
            r["vs_sdpa_time"] = r["ms"] / rows["sdpa"]["ms"]


# ---------------------------------------------------------------- 4. generation

def generation_section(suite: Suite, sec: dict[str, Any]) -> None:
    from transformers import LogitsProcessor, LogitsProcessorList

    prompt, new = (8, 6) if suite.tiny else (128, 128)
    batches = (1, 2) if suite.tiny else (1, 8)
    sec.update(model="LlamaForCausalLM", prompt=prompt, new_tokens=new, rows={})
    rows = sec["rows"]

    class Clock(LogitsProcessor):
        """Called once per generated token, after that step's forward: the times give prefill and decode."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores):  # noqa: ANN001
            suite.sync()
            self.times.append(time.perf_counter())
            return scores

    def run(model: torch.nn.Module, ids: torch.Tensor, **kw: Any) -> dict[str, float]:
        clock = Clock()
        suite.sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([clock]),
                                 **kw)
        suite.sync()
        end = time.perf_counter()
        steps = len(clock.times)
        decode_s = end - clock.times[0]
        return {"prefill_ms": (clock.times[0] - t0) * 1e3, "decode_s": decode_s, "steps": steps,
                "new_tokens": int(out.shape[1] - ids.shape[1]),
                "decode_tok_s": ids.shape[0] * (steps - 1) / decode_s if steps > 1 else float("nan"),
                "total_s": end - t0}

    def measured(model: torch.nn.Module, ids: torch.Tensor, warmups: int, **kw: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        for _ in range(warmups):
            run(model, ids, **kw)
        warm_s = time.perf_counter() - t0
        runs = [run(model, ids, **kw) for _ in range(2 if not suite.tiny else 1)]
        best = min(runs, key=lambda r: r["total_s"])
        return {"warmup_s": round(warm_s, 1), "prefill_ms": statistics.median(r["prefill_ms"] for r in runs),
                "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
                "decode_ms_per_step": 1e3 * statistics.median(r["decode_s"] / max(r["steps"] - 1, 1) for r in runs),
                "new_tokens": best["new_tokens"]}

    suite.log(f"generation: Llama LM, prompt {prompt}, {new} new tokens, batches {batches}")
    eager = llama_lm(suite, prompt + new, suite.dtype, "eager", use_cache=True)
    sdpa = llama_lm(suite, prompt + new, suite.dtype, "sdpa", use_cache=True)
    sdpa.load_state_dict(eager.state_dict())
    vocab = eager.config.vocab_size
    prompts = {b: torch.randint(0, vocab, (b, prompt), generator=torch.Generator().manual_seed(4 + b)).to(suite.device)
               for b in batches}
    for b in batches:
        with step(suite, rows, f"eager dynamic cache b{b}"):
            rows[f"eager dynamic cache b{b}"] = measured(eager, prompts[b], 1, disable_compile=True)
        with step(suite, rows, f"sdpa static cache b{b}"):
            rows[f"sdpa static cache b{b}"] = measured(sdpa, prompts[b], 1, cache_implementation="static",
                                                       disable_compile=True)
    if str(suite.device).startswith("cuda"):
        # transformers' own recipe: with a static cache on a GPU, generate compiles the decode step itself
        # (its CompileConfig: fullgraph, "reduce-overhead", CUDA graphs with the step marking they need; a
        # forward compiled by hand in that mode fails with "accessing tensor output of CUDAGraphs that has
        # been overwritten" under torch 2.11)
        compiled = {"cache_implementation": "static", "disable_compile": False}
    else:  # no auto-compile off-GPU: the CPU smoke run compiles the forward by hand
        sdpa.forward = suite.compile(sdpa.forward, fullgraph=True)
        compiled = {"cache_implementation": "static", "disable_compile": True}
    for b in batches:
        name = f"sdpa static cache + compile b{b}"
        if not suite.need(suite.compile_estimate, rows, name):
            continue
        with step(suite, rows, name):
            rows[name] = measured(sdpa, prompts[b], 2, **compiled)
    del sdpa
    suite.cleanup()
    # graphopt's generation: the prefill and decode graphs of the same model, timed by the same clock
    # (its generate calls a streamer's put per token; transformers' LogitsProcessor clock is not there)
    from graphopt.generate.measure import time_generation

    with step(suite, rows, "graphopt prepare_generation"):
        t0 = time.perf_counter()
        graphs = graphopt.prepare_generation(eager, max_length=prompt + new + 8)
        rows["graphopt prepare_generation"] = {"build_s": round(time.perf_counter() - t0, 1),
                                               "check": graphs.check.summary()}
    sec["graphopt_generate"] = "graphopt.prepare_generation(...).generate"
    for b in batches:
        for cuda_graphs in (False, True):  # decode replayed from CUDA graphs, and without them
            graphs.cuda_graphs = cuda_graphs
            name = f"graphopt b{b}" + (" cuda graphs" if cuda_graphs else "")
            with step(suite, rows, name):
                figures = [time_generation(graphs.generate, prompts[b], None, new, eos_token_id=None)
                           for _ in range(3 if not suite.tiny else 1)]
                rows[name] = {"prefill_ms": statistics.median(f.prefill_ms for f in figures[1:] or figures),
                              "decode_ms_per_step": statistics.median(f.decode_ms for f in figures[1:] or figures),
                              "new_tokens": new}
                rows[name]["decode_tok_s"] = b * 1e3 / rows[name]["decode_ms_per_step"]
                if cuda_graphs:
                    rows[name]["cuda_graphs"] = graphs.cuda_graphs_note or "replayed"


# ---------------------------------------------------------------- markdown

def _gib(n: Any) -> str:
    """GiB to 2 decimals; below 0.1 GiB in MiB, marked (the tiny CPU sizes)."""
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return ""
    return f"{n / 2**30:.2f}" if abs(n) >= 0.1 * 2**30 else f"{n / 2**20:.2f} MiB"


def _f(x: Any, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, (int, float)) and not isinstance(x, bool) else ""


def _status(row: dict[str, Any]) -> str:
    s = row.get("status", "")
    return f"{s}: {row.get('error', '')[:160]}" if s == "error" else s


def render_markdown(data: dict[str, Any]) -> str:
    env = data.get("env", {})
    begin, end = markers("gpu_suite")
    out = [begin, "## GPU suite (benchmarks/gpu_suite.py)", ""]
    where = env.get("gpu") or env.get("cpu") or env.get("host_cpu", "?")
    out.append(f"Measured on **{where}**" + (f", driver {env.get('driver')}" if env.get("driver") else "")
               + f"; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), transformers {env.get('transformers')}, "
               f"graphopt {env.get('graphopt_commit', 'unknown')}; {data['args'].get('dtype')}; "
               f"{'finished' if data.get('finished') else 'NOT finished'} in {data.get('elapsed_s')} s "
               f"(budget {data['args'].get('total_seconds')} s).")
    if env.get("nvidia_smi"):
        out.append(f"nvidia-smi: `{env['nvidia_smi']}`")
    out.append("Time: median ms after warm-up (CUDA events on a GPU); memory: peak allocated above the baseline, GiB; "
               "rel L2 against eager (attention, blocked) or fp32 (precision).")
    secs = data.get("sections", {})
    att = secs.get("attention")
    if att:
        out += ["", "### Attention", ""]
        if att.get("status") not in (None, "done"):
            out.append(f"Section: {_status(att)}")
        out += ["| model | T | batch | variant | ms | x eager | peak GiB | rel L2 vs eager | compile / optimize s "
                "| peers' H100 ms / GB | status |",
                "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
        for case in att.get("cases", []):
            rows = case.get("rows", {})
            base = rows.get("eager", {}).get("ms")
            peers = PEERS_H100.get((case["model"], case["seq"]), {})
            if case.get("status") not in (None, "done") and not rows:
                out.append(f"| {case['model']} | {case['seq']} | {case['batch']} | | | | | | | | "
                           f"{_status(case)} |")
            for name in ("eager", "sdpa", "graphopt", "compile(eager)", "compile(sdpa)", "compile(graphopt)"):
                r = rows.get(name)
                if r is None:
                    continue
                p = peers.get(name)
                peer = f"{p[0]}" + (f" / {p[1]}" if p[1] is not None else "") if p else ""
                secs_s = r.get("compile_s", r.get("optimize_s", ""))
                ratio = _f(r["ms"] / base, ".2f") if base and "ms" in r else ""
                out.append(f"| {case['model']} | {case['seq']} | {case['batch']} | {name} | {_f(r.get('ms'), '.2f')} | "
                           f"{ratio} | {_gib(r.get('peak_bytes'))} | {_f(r.get('rel_l2'), '.1e')} | {secs_s} | "
                           f"{peer} | "
                           f"{_status(r)} |")
        notes = []
        for case in att.get("cases", []):
            g = case.get("graphopt")
            if g:
                notes.append(f"- {case['model']} T{case['seq']}: graphopt {g['sdpa_nodes']} sdpa nodes, optimize "
                             f"{g['optimize_s']} s (capture {g['capture_s']} s); rolled back: "
                             f"{g['rolled_back'] or 'none'}; final numerics {g.get('final_numerics', '')}"
                             + (f"; declined: {'; '.join(g['declined'])[:400]}" if g["declined"] else ""))
            rows = case.get("rows", {})
            if all(k in rows and "ms" in rows[k] for k in ("graphopt", "sdpa")):
                line = (f"- {case['model']} T{case['seq']} targets: graphopt / sdpa time "
                        f"{rows['graphopt']['ms'] / rows['sdpa']['ms']:.3f}, memory "
                        f"{rows['graphopt']['peak_bytes'] / max(rows['sdpa']['peak_bytes'], 1):.3f}")
                if "ms" in rows.get("compile(eager)", {}):
                    ratio = rows["graphopt"]["ms"] / rows["compile(eager)"]["ms"]
                    line += f"; graphopt / compile(eager) time {ratio:.3f}"
                if "ms" in rows.get("compile(graphopt)", {}):
                    best = min(rows[k]["ms"] for k in ("sdpa", "compile(sdpa)") if "ms" in rows.get(k, {}))
                    line += (f"; compile(graphopt) / min(sdpa, compile(sdpa)) "
                             f"{rows['compile(graphopt)']['ms'] / best:.3f}")
                notes.append(line)
        if notes:
            out += [""] + notes
        out.append("")
        out.append("Peers' figures are the issue's H100 (bf16) measurements, not ours: compile(eager) is their "
                   "\"torch.compile\".")
    pre = secs.get("precision")
    if pre:
        out += ["", f"### Precision (Llama LM, batch 1, T{pre.get('seq')}, from the fp32 model)", ""]
        if pre.get("status") not in (None, "done"):
            out.append(f"Section: {_status(pre)}")
        out += ["| variant | ms | speed-up vs fp32 | peak GiB | rel L2 vs fp32 | top-1 vs fp32 | optimize s | plan "
                "| status |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
        rows = pre.get("rows", {})
        base = rows.get("fp32 eager", {}).get("ms")
        for name, r in rows.items():
            plan = r.get("plan", {})
            summary = plan.get("status", "") + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(plan['nodes'].items()))})"
                                                if plan.get("nodes") else "")
            if plan.get("reason"):
                summary += f"; {plan['reason'][:160]}"
            ratio = _f(base / r["ms"], ".2f") + "x" if base and "ms" in r else ""
            out.append(f"| {name} | {_f(r.get('ms'), '.2f')} | {ratio} | {_gib(r.get('peak_bytes'))} | "
                       f"{_f(r.get('rel_l2'), '.2e')} | {_f(r.get('top1'), '.4f')} | {r.get('optimize_s', '')} | "
                       f"{summary} | {_status(r)} |")
    blk = secs.get("blocked")
    if blk:
        budget = _gib(blk.get("budget_bytes"))
        budget += "" if budget.endswith("MiB") or not budget else " GiB"
        out += ["", f"### Blocked (Llama, batch 1, T{blk.get('seq')}, budget {blk.get('fraction', 0.25):.0%} of "
                f"eager's peak = {budget})", ""]
        if blk.get("status") not in (None, "done"):
            out.append(f"Section: {_status(blk)}")
        out += ["| variant | ms | x eager | peak allocated GiB | peak reserved GiB | predicted GiB | rel L2 vs eager "
                "| status |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        rows = blk.get("rows", {})
        base = rows.get("eager", {}).get("ms")
        for name, r in rows.items():
            ratio = _f(r["ms"] / base, ".2f") if base and "ms" in r else ""
            status = _status(r) or r.get("pass_status", "")
            if r.get("status") == "BudgetError":
                status = f"BudgetError: {r.get('error', '')[:200]}"
            out.append(f"| {name} | {_f(r.get('ms'), '.2f')} | {ratio} | {_gib(r.get('peak_bytes'))} | "
                       f"{_gib(r.get('peak_reserved_bytes'))} | {_gib(r.get('predicted_peak_bytes'))} | "
                       f"{_f(r.get('rel_l2'), '.1e')} | {status} |")
    gen = secs.get("generation")
    if gen:
        out += ["", f"### Generation (Llama LM, prompt {gen.get('prompt')}, {gen.get('new_tokens')} new tokens, "
                "greedy)", ""]
        if gen.get("status") not in (None, "done"):
            out.append(f"Section: {_status(gen)}")
        out += ["| variant | prefill ms | decode tokens/s | decode ms/step | x eager decode | warm-up s | status |",
                "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        rows = gen.get("rows", {})
        for name, r in rows.items():
            found = re.search(r" b(\d+)\b", name)
            b = found.group(1) if found else ""
            base = rows.get(f"eager dynamic cache b{b}", {}).get("decode_tok_s")
            ratio = _f(r["decode_tok_s"] / base, ".2f") if base and "decode_tok_s" in r else ""
            out.append(f"| {name} | {_f(r.get('prefill_ms'), '.1f')} | {_f(r.get('decode_tok_s'), '.1f')} | "
                       f"{_f(r.get('decode_ms_per_step'), '.2f')} | {ratio} | {r.get('warmup_s', '')} | {_status(r) or r.get('cuda_graphs', '')} |")
        out.append("")
        out.append("decode tokens/s counts every sequence of the batch; transformers' static cache + compile is "
                   "the bar for graphopt's decode (issue 19).")
    out += ["", end, ""]
    return "\n".join(out)


# ---------------------------------------------------------------- driver

RUNNERS = {"attention": attention_section, "precision": precision_section, "blocked": blocked_section,
           "generation": generation_section}


def run_sections(suite: Suite, names: list[str]) -> None:
    total = suite.args.total_seconds
    shares = {n: SHARES[n] for n in names}
    scale = sum(shares.values())
    cumulative = 0.0
    use_alarm = hasattr(signal, "setitimer")
    if use_alarm:
        signal.signal(signal.SIGALRM, _alarm)
    for name in names:
        cumulative += shares[name] / scale
        # this section's deadline: its share plus what the earlier ones left unused, within the total
        suite.deadline = suite.start + total * cumulative
        sec: dict[str, Any] = {"status": "running", "started_s": round(suite.elapsed(), 1)}
        suite.data["sections"][name] = sec
        suite.section = sec
        if suite.left() < 5:
            sec["status"] = "skipped: time budget"
            suite.log(f"{name}: skipped: time budget")
            suite.save()
            continue
        suite.log(f"== {name} (until {suite.deadline - suite.start:.0f} s)")
        suite.save()
        try:
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, max(suite.left(), 0.1))
            RUNNERS[name](suite, sec)
            sec["status"] = "done"
        except TimeBudget:
            sec["status"] = "interrupted: time budget"
            suite.log(f"{name}: interrupted: time budget")
        except Exception as exc:  # noqa: BLE001
            sec.update(_error(exc))
            suite.log(f"{name}: {sec['error'][:400]}")
        finally:
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
            sec["seconds"] = round(suite.elapsed() - sec["started_s"], 1)
            with contextlib.suppress(Exception):
                suite.cleanup()
                torch._dynamo.reset()
            suite.save()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="See the module docstring for what each section measures.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="gpu_suite_out", help="folder for gpu_suite.json and gpu_suite.md")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    p.add_argument("--total-seconds", type=float, default=450.0, help="the whole run's time budget")
    p.add_argument("--tiny", action="store_true", help="tiny models and sequences (the CPU test)")
    p.add_argument("--smoke", action="store_true", help="= --device cpu --tiny, short budget, fewer runs")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--runs", type=int, default=10, help="timed calls per variant (fewer for slow calls)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default: inductor; eager with --tiny, so CPU tests skip codegen)")
    p.add_argument("--attention-cases", default="", help="model:seq:batch,... (default: the issue's cases)")
    p.add_argument("--precision-seq", type=int, default=2048)
    p.add_argument("--blocked-seq", type=int, default=8192)
    p.add_argument("--error-budget", type=float, default=2e-2, help="precision section: rel L2 budget")
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.tiny = "cpu", True
        args.runs, args.warmup = min(args.runs, 3), min(args.warmup, 1)
    if args.compile_backend is None:
        args.compile_backend = "eager" if args.tiny else "inductor"
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no GPU; use --device cpu --tiny (or --smoke)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    suite = Suite(args)
    names = [n for n in SECTIONS if n in args.sections.split(",")]
    try:
        suite.data["env"] = environment(args.device)
    except Exception as exc:  # noqa: BLE001
        suite.data["env"] = {"error": _error(exc)["error"]}
    suite.log(f"gpu_suite: {args.device} {args.dtype}, sections {names}, budget {args.total_seconds:.0f} s; "
              f"{suite.data['env'].get('gpu') or suite.data['env'].get('cpu', '')}; graphopt {GRAPHOPT_IMPORT}")
    suite.save()
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows are fp32 (the precision section's reference)
    run_sections(suite, names)
    suite.data["finished"] = True
    suite.save()
    suite.log(f"wrote {suite.json_path} and {suite.md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
