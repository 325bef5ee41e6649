"""The benchmark suite: the main job's CLI and result files, the providers' math, the GPU suite and profiler
scripts' failure modes on a machine without a GPU."""
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import models as M
from benchmarks import providers as P
from benchmarks import throughput as TP
from qrlora_kernels.testing import REL_TOL, assert_rel_close

REPO = Path(__file__).resolve().parents[1]
TORCH_PROVIDERS = [name for name, p in P.PROVIDERS.items() if p.backend != "triton"]
META_KEYS = {"gpu", "torch", "triton", "cuda", "date", "git_commit", "command", "suite", "timing_method",
             "peak_memory_method", "providers_timed", "providers_not_timed"}
ROW_KEYS = {"provider", "backend", "strategy", "shape", "out_features", "in_features", "tokens", "rank", "dtype",
            "mode", "median_ms", "p20_ms", "p80_ms", "tflops", "gflop", "ratio_vs_frozen", "ratio_vs_peft",
            "peak_mem_mb", "status"}
no_gpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


def _env_without_interpreter():
    # tests/conftest.py turns the Triton interpreter on for this process; the CLI must see a plain CPU machine.
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # The shell scripts take $PYTHON (default python3, which need not be the interpreter running the tests).
    env["PYTHON"] = sys.executable
    # One thread: on this shared 2-core machine, OpenMP threads waiting for descheduled siblings made the tiny
    # cases several times slower than running them on one core.
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One small CLI run shared by the schema tests: every torch provider, plus a Triton one that the CPU
    must report as not timed, plus the tiny Llama model level."""
    out = tmp_path_factory.mktemp("throughput")
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--shapes", "48x32", "--tokens", "32", "--ranks", "16,tau",
           "--dtype", "fp32", "--providers", ",".join(TORCH_PROVIDERS + ["qrlora_triton"]),
           "--model-presets", "tiny-llama", "--no-qr", "--device", "cpu", "--out", str(out)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=_env_without_interpreter(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc, time.perf_counter() - started


def test_cli_writes_json_with_schema(cli_run):
    out, _, _ = cli_run
    data = json.loads((out / "throughput.json").read_text())
    assert META_KEYS <= set(data["meta"]), META_KEYS - set(data["meta"])
    assert data["meta"]["torch"] == torch.__version__ and data["meta"]["gpu"] is None
    assert data["meta"]["git_commit"] not in ("", None)
    assert "throughput" in data["meta"]["command"] and "--shapes 48x32" in data["meta"]["command"]
    rows = data["rows"]
    assert rows and all(ROW_KEYS <= set(r) for r in rows), [ROW_KEYS - set(r) for r in rows][:1]


def test_cli_every_provider_ran(cli_run):
    out, _, _ = cli_run
    data = json.loads((out / "throughput.json").read_text())
    rows, meta = data["rows"], data["meta"]
    ranks = [16, round(TP.TAU_RANK_FRACTION * 32)]
    for name in TORCH_PROVIDERS:
        for mode in P.MODES:
            wanted = ranks if P.PROVIDERS[name].uses_rank else [None]
            got = sorted((r["rank"] for r in rows if r["provider"] == name and r["mode"] == mode),
                         key=lambda v: -1 if v is None else v)
            assert got == wanted, f"{name} {mode}: ranks {got}, expected {wanted}"
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    assert all(math.isfinite(r["median_ms"]) and r["median_ms"] > 0 and r["tflops"] > 0 for r in rows)
    assert sorted(meta["providers_timed"]) == sorted(TORCH_PROVIDERS)
    assert "qrlora_triton" in meta["providers_not_timed"] and "not timed on CPU" in meta["providers_not_timed"][
        "qrlora_triton"]
    assert not [r for r in rows if r["provider"] == "qrlora_triton"]


def test_cli_ratios_are_same_run_quotients(cli_run):
    out, _, _ = cli_run
    rows = json.loads((out / "throughput.json").read_text())["rows"]
    for r in rows:
        frozen = next(f for f in rows if f["provider"] == "frozen_linear" and f["mode"] == r["mode"])
        assert r["ratio_vs_frozen"] == pytest.approx(r["median_ms"] / frozen["median_ms"])
        if r["rank"] is None:
            assert r["ratio_vs_peft"] is None
        else:
            peft = next(f for f in rows if f["provider"] == "peft_lora" and f["mode"] == r["mode"]
                        and f["rank"] == r["rank"])
            assert r["ratio_vs_peft"] == pytest.approx(r["median_ms"] / peft["median_ms"])


def test_cli_writes_csv_png_models_and_states_what_was_not_timed(cli_run):
    out, proc, seconds = cli_run
    rows = json.loads((out / "throughput.json").read_text())["rows"]
    with open(out / "throughput.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) and ROW_KEYS <= set(csv_rows[0])
    png = (out / "throughput.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    models = json.loads((out / "models.json").read_text())
    assert {r["method"] for r in models["rows"]} == set(M.METHODS)
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in models["rows"]), models["rows"]
    # state_mb is exact: store_r=False saves exactly the R buffers, 2 layers x (query, value) of rank x width.
    by = {r["method"]: r for r in models["rows"] if r["model"] == "tiny-llama"}
    full, q_only = by["qrlora_tau"], by["qrlora_tau_q"]
    r_bytes = 4 * full["rank"] * M.MODEL_PRESETS["tiny-llama"].width * 4  # float32
    assert full["state_mb"] - q_only["state_mb"] == pytest.approx(r_bytes / 2**20)
    assert by["full_ft"]["state_mb"] < q_only["state_mb"] < full["state_mb"]
    assert "not timed: qrlora_triton" in proc.stdout
    assert seconds < 120
    summary = TP.summarize(out)
    assert "48x32" in summary and "tiny-llama" in summary


def test_cpu_default_plan_and_announcement(capsys):
    plan = TP.resolve_plan(TP.build_parser().parse_args([]), cuda=False)
    assert plan["suite"] == "cpu-default" and plan["dtype"] == "fp32"
    assert not [p for p in plan["providers"] if P.PROVIDERS[p].backend == "triton"]
    assert TP.default_out_dir(plan, "cpu") == TP.RESULTS_DIR / "cpu-default"
    TP._announce(plan, "cpu")
    said = capsys.readouterr().out
    assert "CPU default" in said and "NOT timed: the Triton path" in said and "not GPU numbers" in said
    gpu = TP.resolve_plan(TP.build_parser().parse_args([]), cuda=True)
    assert gpu["dtype"] == "bf16" and gpu["tokens"] == [512, 2048, 8192, 16384] and "peft_lora" in gpu["providers"]
    assert {"qrlora_triton", "qrlora_triton_lowrank", "qrlora_triton_merged"} <= set(gpu["providers"])


def test_help_lists_presets_and_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        TP.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in list(TP.LAYER_PRESETS) + list(P.PROVIDERS) + ["--preset", "--tokens", "--ranks", "--dtype", "--modes",
                                                               "--providers", "--out", "--quick", "--model-level",
                                                               "--no-qr", "--case", "28672x8192"]:
        assert word in text, word


@pytest.mark.parametrize("argv, message", [
    (["--ranks", "abc"], "ranks must be positive ints or 'tau'"),
    (["--tokens", "0"], "tokens must be a comma-separated list of positive ints"),
    (["--providers", "lora"], "unknown provider"),
    (["--preset", "gpt-9"], "unknown preset"),
    (["--shapes", "12by3"], "shapes are OUTxIN"),
    (["--case", "shape=4x4,tokens=8"], "--case needs rank, provider"),
])
def test_bad_options_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        TP.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("spec, message", [
    ("shape=4x4,tokens=8,rank=2,provider=nope", "provider 'nope' is unknown"),
    ("shape=4x4,tokens=-1,rank=2,provider=full_ft", "tokens must be a positive int"),
    ("shape=four,tokens=8,rank=2,provider=full_ft", "shape must be OUTxIN"),
    ("shape=4x4,tokens=8,rank=2,provider=full_ft,colour=red", "unknown --case key"),
    ("shape=4x4,tokens=8,rank=2,provider=full_ft,mode=bwd", "mode must be one of"),
    ("tokens", "items are key=value"),
])
def test_parse_case_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        TP.parse_case(spec)


def test_case_runs_one_provider_on_cpu(capsys):
    assert TP.main(["--case", "shape=48x32,tokens=16,rank=16,provider=qrlora_torch,mode=fwd+bwd,iters=2",
                    "--device", "cpu"]) == 0
    assert "ran 2 iterations of bench/qrlora_torch/48x32/T16/r16/fwd+bwd" in capsys.readouterr().out


@pytest.mark.parametrize("name", TORCH_PROVIDERS)
def test_provider_computes_the_layer_and_its_input_gradient(name):
    provider = P.PROVIDERS[name]
    case = P.Case(48, 32, 24, 16, torch.float32, "fwd+bwd")
    module = P.build_module(provider, case)
    xs, dys = P.make_inputs(case, 2)
    expected = P.reference_output(provider, module, xs[1])
    with torch.no_grad():
        assert_rel_close(module(xs[1]), expected, REL_TOL[torch.float32], name=f"{name} output")
    # The step's first call uses buffer 1; its dx must be dY @ (d y / d x) of the float64 reference.
    grads = P.make_step(module, case, xs, dys)()
    x64 = xs[1].detach().double().requires_grad_(True)
    ref = P.reference_output(provider, module, x64)
    ref_dx, = torch.autograd.grad(ref, x64, dys[1].double())
    assert_rel_close(grads[0], ref_dx, REL_TOL[torch.float32], name=f"{name} dx")
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert len(grads) == 1 + len(trainable) and all(g.shape == p.shape for g, p in zip(grads[1:], trainable))
    assert bool(trainable) == (name != "frozen_linear")


@pytest.mark.parametrize("name", [n for n, p in P.PROVIDERS.items() if p.backend == "triton"])
def test_triton_provider_computes_the_layer(name):
    # Under the interpreter (tests/conftest.py turns it on without a GPU), on the smallest legal shapes.
    provider = P.PROVIDERS[name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reason = P.unavailable_reason(provider, device)
    if reason is not None:
        pytest.skip(reason)
    case = P.Case(48, 32, 32, 16, torch.float32, "fwd+bwd", device)
    module = P.build_module(provider, case)
    xs, dys = P.make_inputs(case, 2)
    grads = P.make_step(module, case, xs, dys)()
    x64 = xs[1].detach().double().requires_grad_(True)
    ref_dx, = torch.autograd.grad(P.reference_output(provider, module, x64), x64, dys[1].double())
    tol = REL_TOL["tf32"] if device == "cuda" else REL_TOL[torch.float32]
    assert_rel_close(grads[0], ref_dx, tol, name=f"{name} dx")
    with torch.no_grad():
        assert_rel_close(module(xs[0]), P.reference_output(provider, module, xs[0]), tol, name=f"{name} output")


def test_adapters_are_not_timed_at_their_zero_initialisation():
    case = P.Case(48, 32, 24, 16, torch.float32, "fwd")
    peft_layer = P.build_module(P.PROVIDERS["peft_lora"], case)
    assert peft_layer.lora_B["default"].weight.abs().min() > 0
    qr_layer = P.build_module(P.PROVIDERS["qrlora_torch"], case)
    assert qr_layer.lam.abs().min() > 0 and qr_layer.Q.abs().max() > 0
    xs, _ = P.make_inputs(case, 3)
    assert len({x.data_ptr() for x in xs}) == 3 and all(x.abs().min() > 0 for x in xs)


def test_steps_rotate_through_the_input_buffers():
    case = P.Case(48, 32, 24, 16, torch.float32, "fwd")
    module = P.build_module(P.PROVIDERS["frozen_linear"], case)
    seen = []
    module.register_forward_hook(lambda mod, args, out: seen.append(args[0].data_ptr()))
    xs, dys = P.make_inputs(case, P.buffer_count(case))
    step = P.make_step(module, case, xs, dys)
    for _ in range(2 * len(xs)):
        step()
    assert set(seen) == {x.data_ptr() for x in xs} and seen[0] != seen[1]


def test_flop_counts_follow_the_algorithms():
    T, N, K, r = 64, 48, 32, 16
    fwd = P.Case(N, K, T, r, torch.float32, "fwd")
    train = P.Case(N, K, T, r, torch.float32, "fwd+bwd")
    f = {name: (P.flops(P.PROVIDERS[name], fwd, "lowrank"), P.flops(P.PROVIDERS[name], train, "lowrank"))
         for name in ("frozen_linear", "full_ft", "peft_lora", "qrlora_torch")}
    gemm = 2 * T * N * K
    assert f["frozen_linear"] == (gemm, 2 * gemm) and f["full_ft"] == (gemm, 3 * gemm)
    # Both adapters add the two projections forward; LoRA's backward adds two more (its weight gradients).
    assert f["peft_lora"][0] == f["qrlora_torch"][0] > gemm
    assert f["peft_lora"][1] - f["qrlora_torch"][1] == f["qrlora_torch"][0] - gemm
    merged = P.flops(P.PROVIDERS["qrlora_torch"], fwd, "merged")
    assert merged - gemm == 2 * N * K * r
    # Q only: the lowrank update works on the T x N output (4TNr each way); merged forms R = Q^T W0 each way.
    q_only = P.PROVIDERS["qrlora_torch_q"]
    assert P.flops(q_only, fwd, "lowrank") - gemm == 4 * T * N * r
    assert P.flops(q_only, train, "lowrank") - 2 * gemm == 8 * T * N * r
    assert P.flops(q_only, fwd, "merged") - merged == 2 * N * K * r
    assert P.flops(q_only, train, "merged") - P.flops(P.PROVIDERS["qrlora_torch"], train, "merged") == 4 * N * K * r


def test_case_validation():
    with pytest.raises(ValueError, match="rank 40 exceeds min"):
        P.Case(48, 32, 8, 40, torch.float32, "fwd")
    with pytest.raises(ValueError, match="mode must be one of"):
        P.Case(48, 32, 8, 4, torch.float32, "bwd")
    with pytest.raises(ValueError, match="tokens must be a positive int"):
        P.Case(48, 32, 0, 4, torch.float32, "fwd")


def test_time_budget_marks_cases_not_run():
    plan = TP.resolve_plan(TP.build_parser().parse_args(["--shapes", "48x32", "--tokens", "8", "--ranks", "16",
                                                          "--providers", "frozen_linear,peft_lora"]), cuda=False)
    rows, not_timed = TP.run_layers(plan, "cpu", time_budget=0.0, progress=False)
    assert not_timed == {} and len(rows) == 4
    assert all(r["status"] == "not run" and "time budget" in r["note"] and r["ratio_vs_frozen"] is None
               for r in rows)


def test_a_failing_provider_gives_an_error_row_and_the_others_still_run(monkeypatch):
    plan = TP.resolve_plan(TP.build_parser().parse_args(["--shapes", "48x32", "--tokens", "8", "--ranks", "16",
                                                          "--modes", "fwd", "--providers",
                                                          "frozen_linear,peft_lora,qrlora_torch"]), cuda=False)
    real_build = P.build_module

    def build(provider, case, **kwargs):
        if provider.name == "peft_lora":
            raise RuntimeError("simulated out of memory")
        return real_build(provider, case, **kwargs)

    monkeypatch.setattr(P, "build_module", build)
    rows, _ = TP.run_layers(plan, "cpu", progress=False)
    status = {r["provider"]: (r["status"], r.get("note")) for r in rows}
    assert status["peft_lora"] == ("error", "RuntimeError: simulated out of memory")
    assert status["frozen_linear"][0] == status["qrlora_torch"][0] == "ok"
    qr_row = next(r for r in rows if r["provider"] == "qrlora_torch")
    assert qr_row["ratio_vs_peft"] is None and qr_row["ratio_vs_frozen"] > 0


def test_plot_refuses_rows_without_measurements(tmp_path):
    from benchmarks.plots import plot_layers
    with pytest.raises(ValueError, match="no measured row to plot"):
        plot_layers([{"provider": "full_ft", "status": "error"}], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_model_level_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown method 'dora'"):
        M.build_model(M.MODEL_PRESETS["tiny-llama"], "dora")
    with pytest.raises(ValueError, match="unknown model preset 'gpt-9'"):
        M.run_models(["gpt-9"])


def test_qr_section_through_benchmarks_qr(tmp_path, monkeypatch):
    import benchmarks.qr as qr_bench
    monkeypatch.setattr(qr_bench, "POOL_PAUSE_S", 0.0, raising=False)
    result = TP.run_qr_section("cpu", [(32, 32)], tmp_path)
    assert result["status"] == "ok", result
    stored = json.loads((tmp_path / "qr.json").read_text())
    assert stored["rows"] and {"gpu", "git_commit"} <= set(stored["meta"])
    monkeypatch.delattr(qr_bench, "run")
    skipped = TP.run_qr_section("cpu", [(32, 32)], tmp_path)
    assert skipped == {"status": "skipped", "reason": "benchmarks.qr has no run() function"}


def test_checkpoint_size_benchmark_measures_both_callback_modes(tmp_path):
    """On a small BERT saved locally: four rows (two target sets x frozen weights left out or kept); every trainable
    value is in each checkpoint, and leaving the frozen weights out shrinks model.safetensors by at least their
    size."""
    import benchmarks.checkpoint_size as CS
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(0)
    base = BertForMaskedLM(BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, max_position_embeddings=32))
    base.save_pretrained(tmp_path / "bert")
    frozen_bytes = 4 * sum(p.numel() for n, p in base.bert.named_parameters())  # a lower bound: float32, no head
    CS.main(["--model", str(tmp_path / "bert"), "--out-dir", str(tmp_path / "out")])
    stored = json.loads((tmp_path / "out" / "checkpoint_size.json").read_text())
    rows = {(r["targets"], r["frozen_weights"]): r for r in stored["rows"]}
    assert set(rows) == {(t, f) for t in ("query-value", "all-linear") for f in (False, True)}
    assert rows["query-value", False]["modules"] == 4 and rows["all-linear", False]["modules"] > 4
    for targets in ("query-value", "all-linear"):
        small, whole = rows[targets, False], rows[targets, True]
        assert whole["model_safetensors_bytes"] - small["model_safetensors_bytes"] >= frozen_bytes * 0.9
        assert small["adapter_bytes"] == whole["adapter_bytes"] > 0
        assert small["trainable_values_saved"] == whole["trainable_values_saved"] == small["trainable_params"]
        assert small["checkpoint_bytes"] > small["model_safetensors_bytes"] + small["adapter_bytes"]
    assert stored["meta"]["transformers"] and stored["meta"]["command"]


def test_checkpoint_record_cost_on_a_small_llama():
    import benchmarks.checkpoint_size as CS
    shape = dict(CS.RECORD_COST_SHAPE, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)
    row = CS.measure_record_cost(shape, torch.float32)
    frozen = 3 + 2 * 9  # embeddings, final norm, LM head; per layer 7 projections and 2 norms
    assert row["weights_left_out"] == frozen and row["record_bytes"] == 40 * frozen
    assert row["record_s"] > 0 and row["load_check_s"] > 0 and row["dtype"] == "float32"


def test_init_time_benchmark_times_each_rule_and_writes_its_table(tmp_path, monkeypatch, capsys):
    import benchmarks.init_time as IT
    monkeypatch.setattr(IT, "RESULTS_DIR", tmp_path / "default")
    IT.main(["--layers", "1", "--reps", "1", "--rules", "diag,rank,diag-randomized", "--out", str(tmp_path)])
    assert not (tmp_path / "default").exists()
    stored = json.loads((tmp_path / "init_time.json").read_text())
    methods = [row["method"] for row in stored["rows"]]
    assert methods == ["scipy geqp3 (CPU) + diag rule tau=0.9", "apply_qrlora diag tau=0.9", "apply_qrlora rank=8",
                       "apply_qrlora diag tau=0.9, randomized pivoting"]
    assert all(row["median_ms"] > 0 for row in stored["rows"])
    # The diag rule gives the same ranks through apply_qrlora as through scipy's geqp3.
    assert stored["rows"][0]["ranks"] == stored["rows"][1]["ranks"]
    assert stored["rows"][2]["ranks"] == "8..8 (sum 16)"
    assert stored["meta"]["matrices"] == "1 layers x [768x768, 768x768]"
    # 1 of roberta's 12 layers: the whole-model time is extrapolated, and labelled so.
    assert all(row["full_model_ms_extrapolated"] == pytest.approx(12 * row["median_ms"]) for row in stored["rows"])
    assert "EXTRAPOLATED from 1 of the model's 12 layers" in stored["meta"]["extrapolation"]
    with pytest.raises(SystemExit):
        IT.main(["--rules", "svd"])
    assert "unknown rule(s) ['svd']" in capsys.readouterr().err


def test_init_time_survives_a_failing_rule_writes_after_each_and_checks_the_llama_bars(tmp_path, monkeypatch):
    import benchmarks.init_time as IT
    import qrlora_kernels
    # A 2-layer stand-in for Llama-2-7B's 32 layers (the real shapes take minutes on this CPU): the same code path.
    container, _, _, _ = IT.SHAPES["llama7b"]
    monkeypatch.setitem(IT.SHAPES, "llama7b", (container, {"self_attn.q_proj": (40, 32), "mlp.down_proj": (32, 48)},
                                               32, torch.float32))
    real_apply = qrlora_kernels.apply_qrlora
    written = []

    sizes = []

    def apply(model, config, **kwargs):
        written.append([r["method"] for r in json.loads((tmp_path / "init_time_llama7b.json").read_text())["rows"]]
                       if (tmp_path / "init_time_llama7b.json").exists() else [])
        sizes.append(sum(p.numel() for p in model.parameters()))
        if config.energy == "frobenius":
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_apply(model, config, **kwargs)

    monkeypatch.setattr(qrlora_kernels, "apply_qrlora", apply)
    IT.main(["--shapes", "llama7b", "--layers", "2", "--rules", "diag,frobenius,rank", "--device", "cpu",
             "--out", str(tmp_path)])
    stored = json.loads((tmp_path / "init_time_llama7b.json").read_text())
    rows = {r["method"]: r for r in stored["rows"]}
    # First one untimed warm-up per rule on small weights (the one-time CUDA costs must not be billed to the first
    # rule and multiplied by 16), then the timed runs, the results rewritten after each.
    assert written == [[], [], [], [], ["apply_qrlora diag tau=0.9"],
                       ["apply_qrlora diag tau=0.9", "apply_qrlora frobenius tau=0.9"]]
    assert sizes[:3] == [2 * 256 * 256] * 3 and sizes[3:] == [2 * (40 * 32 + 32 * 48)] * 3
    assert "untimed" in stored["meta"]["warm_up"]
    assert rows["apply_qrlora frobenius tau=0.9"]["status"] == "error"
    assert "simulated" in rows["apply_qrlora frobenius tau=0.9"]["note"]
    diag, rank = rows["apply_qrlora diag tau=0.9"], rows["apply_qrlora rank=8"]
    assert diag["status"] == rank["status"] == "ok" and (diag["bar_s"], rank["bar_s"]) == (30.0, 5.0)
    assert diag["full_model_ms_extrapolated"] == pytest.approx(16 * diag["median_ms"]) and diag["bar_met"] is True
    assert stored["meta"]["layers_timed"] == 2 and stored["meta"]["model_layers"] == 32


def test_multi_adapter_rows_report_their_ratio_to_one_adapter(cli_run):
    out, _, _ = cli_run
    rows = json.loads((out / "throughput.json").read_text())["rows"]
    name = f"qrlora_torch_multi{P.MULTI_ADAPTERS}"
    multi = [r for r in rows if r["provider"] == name]
    assert multi and all(r["status"] == "ok" and r["strategy"] == "lowrank" for r in multi)
    for r in multi:
        single = next(s for s in rows if s["provider"] == "qrlora_torch" and
                      (s["shape"], s["tokens"], s["mode"], s["rank"]) == (r["shape"], r["tokens"], r["mode"], r["rank"]))
        assert r["ratio_vs_single"] == pytest.approx(r["median_ms"] / single["median_ms"])
    assert "1,000 adapters mixed in one batch vs one adapter" in TP.summarize(out)


def test_multi_adapter_batches_mix_every_adapter_per_sequence():
    assert [P.sequence_length(t, 1000) for t in (32, 1000, 2048, 8192, 3000)] == [1, 1, 2, 8, 3]
    case = P.Case(48, 32, 2048, 16, torch.float32, "fwd")
    module = P.build_module(P.PROVIDERS[f"qrlora_torch_multi{P.MULTI_ADAPTERS}"], case)
    assert module.layer.lam.shape == (P.MULTI_ADAPTERS, 16) and module.layer.lam.abs().min() > 0
    assert module.adapter_ids.dtype == torch.int64 and module.adapter_ids.shape == (1024,)
    assert set(module.adapter_ids.tolist()) == set(range(P.MULTI_ADAPTERS))  # every adapter in the batch
    assert torch.equal(module.token_ids()[::2], module.adapter_ids)
    plan = TP.resolve_plan(TP.build_parser().parse_args(
        ["--shapes", "48x32,32x32", "--tokens", "8", "--ranks", "16", "--modes", "fwd", "--multi-shapes", "32x32",
         "--providers", f"qrlora_torch,qrlora_torch_multi{P.MULTI_ADAPTERS}"]), cuda=False)
    cases = [(p.name, c.shape) for p, c in TP.plan_cases(plan, "cpu")]
    assert cases == [("qrlora_torch", "48x32"), ("qrlora_torch", "32x32"),
                     (f"qrlora_torch_multi{P.MULTI_ADAPTERS}", "32x32")]


def test_layer_results_are_written_after_every_group(tmp_path):
    plan = TP.resolve_plan(TP.build_parser().parse_args(["--shapes", "48x32", "--tokens", "8,16", "--ranks", "16",
                                                          "--modes", "fwd", "--providers",
                                                          "frozen_linear,qrlora_torch"]), cuda=False)
    seen = []
    rows, _ = TP.run_layers(plan, "cpu", progress=False, on_rows=lambda rows, not_timed: seen.append(
        [(r["tokens"], r["provider"], r["ratio_vs_frozen"] is not None) for r in rows]))
    assert seen == [[(8, "frozen_linear", True), (8, "qrlora_torch", True)],
                    [(8, "frozen_linear", True), (8, "qrlora_torch", True),
                     (16, "frozen_linear", True), (16, "qrlora_torch", True)]]


def test_summary_covers_qr_bars_and_initialisation(tmp_path):
    from benchmarks.harness import write_results
    qr_rows = [{"m": 64, "n": 64, "routine": name, "status": "ok", "median_ms": ms}
               for name, ms in (("linalg_qr", 2.0), ("svd", 100.0), ("qrcp_geqp3", 5.0), ("qrcp_randomized", 4.0))]
    import benchmarks.qr as qr_bench
    qr_bench.add_ratios(qr_rows)
    write_results("qr", qr_rows, {"gpu": "test"}, tmp_path)
    write_results("init_time_llama7b", [{"method": "apply_qrlora diag tau=0.9", "status": "ok", "median_ms": 2000.0,
                                         "full_model_ms_extrapolated": 32000.0, "bar_s": 30.0, "bar_met": False}],
                  {"matrices": "2 layers x [4096x4096]", "extrapolation": "EXTRAPOLATED from 2 of 32 layers"},
                  tmp_path)
    text = TP.summarize(tmp_path)
    assert "vs_linalg_qr" in text and "2.5" in text
    assert "GPU bar 64x64: qrcp_geqp3 / linalg_qr = 2.5 (<= 3x): MET" in text
    assert "qrcp_randomized / linalg_qr = 2 (<= 1.5x): NOT MET" in text
    assert "qrcp_geqp3 / svd = 0.05 (>= 20x faster): MET" in text
    assert "init_time_llama7b" in text and "3.2e+04" in text and "EXTRAPOLATED from 2 of 32 layers" in text


def test_results_name_the_cpu_model_and_its_vector_extensions(tmp_path):
    from benchmarks.harness import cpu_model
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Example Xeon 9000\nflags\t\t: fpu sse2 avx2 avx512f amx_tile\n\n"
                    "processor\t: 1\nmodel name\t: Example Xeon 9000\nflags\t\t: fpu sse2 avx2 avx512f amx_tile\n")
    assert cpu_model(info) == "Example Xeon 9000 (avx2, avx512f, amx_tile)"
    info.write_text("processor\t: 0\nmodel name\t: Old Core\nflags\t\t: fpu sse2\n")
    assert cpu_model(info) == "Old Core"
    assert cpu_model(tmp_path / "missing") is None
    info.write_text("processor\t: 0\n")
    assert cpu_model(info) is None


def test_cpu_rows_are_checked_against_the_cpu_bars_only():
    """A CPU run must not print the GPU bars as met or not: it is checked against the issue's CPU bars."""
    import benchmarks.qr as qr_bench
    rows = [{"m": 64, "n": 64, "routine": name, "status": "ok", "median_ms": ms}
            for name, ms in (("linalg_qr", 2.0), ("svd", 100.0), ("geqrf", 1.0), ("scipy_geqp3", 10.0),
                             ("qrcp_geqp3", 9.0), ("qrcp_geqp3_rank64", 1.5), ("qrcp_randomized", 4.0),
                             ("qrcp_randomized_raw", 1.2))]
    cpu = qr_bench.bar_checks(rows, on_gpu=False)
    assert [(c["kind"], c["check"], c["met"]) for c in cpu] == [
        ("CPU", "qrcp_geqp3 / scipy_geqp3", True), ("CPU", "qrcp_geqp3_rank64 / scipy_geqp3", False),
        ("CPU", "qrcp_randomized_raw / geqrf", True)]
    text = qr_bench.format_bars(cpu)
    assert "CPU bar 64x64: qrcp_geqp3_rank64 / scipy_geqp3 = 0.15 (<= 0.1x): NOT MET" in text
    assert "GPU" not in text and "linalg_qr" not in text
    gpu = qr_bench.bar_checks(rows, on_gpu=True)
    assert {c["kind"] for c in gpu} == {"GPU"} and len(gpu) == 4


def _script(path, *args, env=None):
    return subprocess.run(["bash", str(REPO / path), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env or _env_without_interpreter())


@no_gpu_only
def test_device_suite_fails_fast_without_gpu():
    started = time.perf_counter()
    proc = _script("benchmarks/device_suite.sh")
    assert proc.returncode == 3 and "no CUDA GPU" in proc.stderr and "Nothing was run" in proc.stderr
    assert time.perf_counter() - started < 60


@no_gpu_only
def test_device_suite_dry_run_checks_every_step_then_the_gpu():
    proc = _script("benchmarks/device_suite.sh", "--dry-run")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    for step in ("timeout", "tar", "build", "qrcp-tests", "qr", "init", "bench", "cuda-tests", "summary",
                 "autotune-knob", "env"):
        assert f"ok    {step}:" in proc.stdout, step
    assert f"ok    results-folder ({REPO / 'benchmarks' / 'results'}):" in proc.stdout
    assert "PYTHONUNBUFFERED=1" in proc.stdout and "note  archive: none" in proc.stdout
    assert "no CUDA GPU" in proc.stderr


def test_device_suite_refuses_a_results_folder_it_cannot_write(tmp_path):
    """--out under a file: exit 2 before anything runs (it went on with an empty folder name, writing its logs into
    the root folder, and exited 0); --dry-run checks the --out it is given."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    env = _env_without_interpreter()
    proc = _script("benchmarks/device_suite.sh", "--allow-cpu", "--only", "summary", "--out", str(blocker / "sub"),
                   env=env)
    assert proc.returncode == 2 and "cannot write the results folder" in proc.stderr, proc.stdout + proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
    proc = _script("benchmarks/device_suite.sh", "--dry-run", "--out", str(blocker / "sub"), env=env)
    assert proc.returncode == 2 and f"FAIL  results-folder ({blocker / 'sub'})" in proc.stderr, proc.stderr


def test_device_suite_step_caps_fit_the_budget_most_important_first():
    text = (REPO / "benchmarks/device_suite.sh").read_text()
    caps = dict(re.findall(r"\[([a-z-]+)\]=(\d+)", re.search(r"declare -A cap=\((.*)\)", text).group(1)))
    assert list(caps) == ["build", "qrcp-tests", "qr", "init", "bench", "cuda-tests"]
    default_budget = int(re.search(r'QRLORA_SUITE_BUDGET_S:-(\d+)', text).group(1))
    assert sum(map(int, caps.values())) <= default_budget - 15 and default_budget <= 570
    order = [text.index(f"run_step {name} ") for name in caps]
    assert order == sorted(order)
    # The tests run once each, verbose (a killed step's log shows what finished), autotuning off.
    # Both test steps select "cuda or gpu" (the device fixture's [cuda] cases and the gpu-marked tests), and
    # every file holding gpu-marked tests is in one of them.
    assert text.count("-k \"cuda or gpu\" tests/test_qrcp.py") == 2 and "-k cuda " not in text
    assert text.count("-k \"cuda or gpu\" \"${cuda_tests[@]}\"") == 1 and "-m gpu" not in text
    files = set(re.search(r"for f in (.*?); do", text, re.S).group(1).replace("\\", " ").split()) | {
        "tests/test_qrcp.py"}
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                "-m", "gpu", "tests"], cwd=REPO, capture_output=True, text=True, timeout=300)
    marked = {line.split("::")[0] for line in collected.stdout.splitlines() if "::" in line}
    assert marked and marked <= files, marked - files
    assert "QRLORA_AUTOTUNE=0" in text.split("run_step cuda-tests", 1)[1]
    assert "QRLORA_AUTOTUNE" not in text.split("run_step bench", 1)[1].split("\n")[0]


@no_gpu_only
def test_device_suite_archives_the_results_after_every_step(tmp_path):
    # --allow-cpu runs the chosen steps without a GPU; of the CUDA QR tests only a gpu-marked one is collected
    # here (and skips), which is enough to see a step logged, recorded and archived into $OUT with the summary.
    env = _env_without_interpreter()
    env["OUT"] = str(tmp_path / "out")
    proc = _script("benchmarks/device_suite.sh", "--allow-cpu", "--only", "qrcp-tests,summary",
                   "--out", str(tmp_path / "results"), env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["device_suite.tgz", "steps.tsv", "summary.txt"]
    import tarfile
    with tarfile.open(out / "device_suite.tgz") as tar:
        names = set(tar.getnames())
        log = tar.extractfile("./qrcp-tests.log").read().decode()
    assert {"./qrcp-tests.log", "./steps.tsv", "./summary.txt", "./environment.txt", "./suite.log"} <= names
    assert "deselected" in log
    assert "1 skipped" in log and "qrcp-tests\tok" in (out / "steps.tsv").read_text()
    summary = (out / "summary.txt").read_text()
    assert "qrcp-tests" in summary and summary.strip().splitlines()[-1] in proc.stdout
    assert not (tmp_path / "out" / "device_suite.tgz.tmp").exists()
    bad = _script("benchmarks/device_suite.sh", "--only", "benchmark")
    assert bad.returncode == 2 and "unknown step 'benchmark'" in bad.stderr


def _env_with_stand_in_python(tmp_path, *, gpu=True, build_kind=None):
    """The suite's environment with $PYTHON a stand-in: `setup.py ...` is a no-op build, the benchmarks (`-m
    benchmarks.qr|init_time|throughput ...`, not `--summary`) only record their arguments (in tmp_path/NAME.args),
    and everything else runs the real interpreter, which (with ``gpu``) reports a 'Fake GPU' and (with
    ``build_kind``) an extension of that kind."""
    fake = tmp_path / "fake"
    fake.mkdir()
    lines = []
    if gpu:
        lines += ["import torch",
                  "torch.cuda.is_available = lambda: True",
                  "torch.cuda.get_device_name = lambda *a: 'Fake GPU'",
                  "torch.cuda.get_device_capability = lambda *a: (9, 0)"]
    if build_kind:
        lines += ["import qrlora_kernels",
                  f"qrlora_kernels.build_info = lambda: {{'kind': {build_kind!r}, 'archs': []}}"]
    (fake / "sitecustomize.py").write_text("\n".join(lines) + "\n")
    python = tmp_path / "python"
    python.write_text("#!/bin/bash\nshopt -s extglob\n"
                      "[[ \"$1\" == setup.py ]] && { echo fake build; exit 0; }\n"
                      f"case \"$1 $2 $*\" in *--summary*) ;; \"-m benchmarks.\"@(qr|init_time|throughput)\\ *)\n"
                      f"    echo \"$@\" > {tmp_path}/\"${{2#benchmarks.}}\".args; exit 0 ;; esac\n"
                      f"PYTHONPATH={fake}:$PYTHONPATH exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    env = _env_without_interpreter()
    env["PYTHON"] = str(python)
    env.pop("OUT", None)
    return env


@no_gpu_only
def test_device_suite_gives_the_time_a_step_left_to_the_next(tmp_path):
    """Steps that take a second of their caps leave the rest to the next: the QR benchmark's own --time-budget
    grows from 55 s to at most 90 s, init keeps 30 s, and the layer benchmark gets the rest (120 s when nothing
    is left over: its 150 s cap less its 30 s margin)."""
    env = _env_with_stand_in_python(tmp_path, gpu=False)
    out = tmp_path / "results"
    proc = _script("benchmarks/device_suite.sh", "--allow-cpu", "--only", "build,qr,init,bench,summary",
                   "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    def inner(name):
        args = (tmp_path / f"{name}.args").read_text().split()
        return int(args[args.index("--time-budget") + 1])
    assert inner("qr") == 90 and inner("init_time") == 30
    # 150 + the caps the build, qr and init left (150 + 75 + 45, less the seconds they took) - 30.
    assert 150 + 270 - 30 - 30 <= inner("throughput") <= 150 + 270 - 30, inner("throughput")
    steps = (out / "steps.tsv").read_text()
    assert all(f"{name}\tok" in steps for name in ("build", "qr", "init", "bench"))


@no_gpu_only
@pytest.mark.parametrize("build_kind", ["cpu", "cuda"])
def test_device_suite_skips_the_qr_steps_after_a_cpu_only_build(tmp_path, build_kind):
    """On a GPU machine where setup.py found no toolkit (a CPU-only extension), the QR steps would time the CPU
    under the GPU's name: the suite says so and skips them; after a CUDA build they run. Here a stand-in
    interpreter reports a GPU, makes the build a no-op and reports the extension's kind."""
    env = _env_with_stand_in_python(tmp_path, build_kind=build_kind)
    out = tmp_path / "results"
    proc = _script("benchmarks/device_suite.sh", "--only", "build,qr,summary", "--out", str(out), env=env)
    assert "device suite on Fake GPU" in proc.stdout
    steps = (out / "steps.tsv").read_text()
    assert "build\tok" in steps
    if build_kind == "cpu":
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "[build] the extension is not a CUDA build" in proc.stdout and "the QR steps are skipped" in proc.stdout
        assert "build-kind\tnot cuda (cpu)" in steps
        assert not (out / "qr.log").exists() and "[qr]" not in proc.stdout
    else:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "not a CUDA build" not in proc.stdout and "qr\tok" in steps and (tmp_path / "qr.args").exists()
    # An earlier build (no build step) is checked the same way.
    again = _script("benchmarks/device_suite.sh", "--only", "qr,summary", "--out", str(tmp_path / "again"), env=env)
    assert ("not a CUDA build" in again.stdout) == (build_kind == "cpu"), again.stdout


def test_device_suite_rejects_bad_budget():
    proc = _script("benchmarks/device_suite.sh", "--budget", "5")
    assert proc.returncode == 2 and "--budget must be a whole number of seconds >= 60" in proc.stderr


def _fake_tool(bin_dir, name):
    """An executable ``name`` on the test PATH that says so if the script ever reaches it."""
    fake = bin_dir / name
    fake.write_text(f"#!/bin/sh\necho fake {name} must not be reached >&2\nexit 0\n")
    fake.chmod(0o755)


def _path_without(tool, tmp_path):
    # A PATH with bash, python and coreutils but certainly no Nsight tool.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("bash", "sed", "tr", "date", "mkdir", "dirname", "env"):
        found = shutil.which(name)
        if found:
            (bin_dir / name).symlink_to(found)
    (bin_dir / "python").symlink_to(sys.executable)
    (bin_dir / "python3").symlink_to(sys.executable)
    env = _env_without_interpreter()
    env["PATH"] = str(bin_dir)
    return env, bin_dir


@pytest.mark.parametrize("tool, product", [("nsys", "Nsight Systems"), ("ncu", "Nsight Compute")])
def test_profile_fails_clearly_without_the_tool(tool, product, tmp_path):
    env, _ = _path_without(tool, tmp_path)
    proc = _script("benchmarks/profile.sh", "--tool", tool, "shape=48x32,tokens=16,rank=16,provider=full_ft", env=env)
    assert proc.returncode == 3 and f"{tool} not found on PATH" in proc.stderr and product in proc.stderr


def test_profile_auto_needs_one_of_the_tools(tmp_path):
    env, _ = _path_without("nsys", tmp_path)
    proc = _script("benchmarks/profile.sh", "shape=48x32,tokens=16,rank=16,provider=full_ft", env=env)
    assert proc.returncode == 3 and "neither nsys (NVIDIA Nsight Systems) nor ncu" in proc.stderr


@no_gpu_only
def test_profile_auto_takes_ncu_when_nsys_is_missing(tmp_path):
    env, bin_dir = _path_without("nsys", tmp_path)
    _fake_tool(bin_dir, "ncu")
    proc = _script("benchmarks/profile.sh", "shape=48x32,tokens=16,rank=16,provider=full_ft", env=env)
    assert proc.returncode == 4 and "using ncu (--tool auto)" in proc.stderr and "fake ncu" not in proc.stderr


@no_gpu_only
def test_profile_fails_clearly_without_a_gpu(tmp_path):
    env, bin_dir = _path_without("nsys", tmp_path)
    _fake_tool(bin_dir, "nsys")
    proc = _script("benchmarks/profile.sh", "shape=48x32,tokens=16,rank=16,provider=full_ft", env=env)
    assert proc.returncode == 4 and "no CUDA GPU visible to torch" in proc.stderr
    assert "fake nsys" not in proc.stderr


def test_profile_needs_a_case():
    proc = _script("benchmarks/profile.sh")
    assert proc.returncode == 2 and "missing CASE" in proc.stderr


def test_triton_rows_on_cpu_are_labelled_as_interpreter_runs():
    case = P.Case(48, 32, 16, 16, torch.float32, "fwd", "cpu")
    assert TP._base_row(P.PROVIDERS["qrlora_triton"], case)["backend"] == "triton-interpreter"
    assert TP._base_row(P.PROVIDERS["qrlora_torch"], case)["backend"] == "torch"


_AUTOTUNE_PROBE = r"""
import json, sys
from qrlora_kernels.kernels import utils, aot_check
out = {"interpreted": utils.INTERPRETED, "autotune": utils.AUTOTUNE,
       "gemm": [c.kwargs for c in utils.gemm_configs()], "project": [c.kwargs for c in utils.project_configs()],
       "lowrank": [c.kwargs for c in utils.lowrank_gemm_configs()],
       "lowrank_tuned": len(utils.lowrank_gemm_configs(autotune=True)), "shared": {}}
from triton.backends import backends
if "nvidia" in backends and sys.argv[1] == "compile" and not aot_check.unsupported_reason():
    # The fixed configs are launched without the autotuner's shared-memory check: they must fit float32.
    utils._GPU_GEMM_CONFIGS, utils._GPU_PROJECT_CONFIGS = utils.gemm_configs(), utils.project_configs()
    utils._GPU_TMA_CONFIGS = []
    for variant in aot_check.variants(["fp32"], False):
        for capability in (80, 90):
            out["shared"][f"sm_{capability} {variant.label}"] = aot_check.compile_kernel(
                variant, variant.configs[0], capability).shared
print(json.dumps(out))
"""


def _autotune_probe(value, mode="list"):
    env = _env_without_interpreter()
    env.pop("QRLORA_AUTOTUNE", None)
    if value is not None:
        env["QRLORA_AUTOTUNE"] = value
    proc = subprocess.run([sys.executable, "-c", _AUTOTUNE_PROBE, mode], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_autotune_knob_picks_one_gpu_config_per_kernel_that_fits_shared_memory():
    tuned = _autotune_probe(None)
    assert not tuned["interpreted"] and tuned["autotune"]
    assert len(tuned["gemm"]) > 1 and len(tuned["project"]) > 1 and any(c["USE_TMA"] for c in tuned["lowrank"])
    fixed = _autotune_probe("0", "compile")
    assert not fixed["autotune"]
    assert len(fixed["gemm"]) == len(fixed["project"]) == len(fixed["lowrank"]) == 1
    assert fixed["lowrank_tuned"] == len(tuned["lowrank"])
    lowrank, = fixed["lowrank"]
    assert not lowrank["USE_TMA"] and not lowrank["PERSISTENT"]
    # Mid-size GPU tiles, not the interpreter's 32x32x16.
    assert min(lowrank["BLOCK_M"], lowrank["BLOCK_N"]) >= 64 and fixed["project"][0]["BLOCK_M"] >= 64
    if fixed["shared"]:
        limits = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}  # the opt-in shared memory per block
        over = {k: v for k, v in fixed["shared"].items() if v > limits[k.split()[0]]}
        assert not over and len(fixed["shared"]) == 20, fixed["shared"]  # 10 fp32 variants x 2 archs


def test_qr_sequential_mode_puts_baselines_first_survives_a_failing_routine_and_writes_after_each(tmp_path,
                                                                                                  monkeypatch):
    # The CUDA mode of benchmarks.qr, run on the CPU: one call per sample, baselines first, an error row for a
    # routine that raises, the JSON rewritten after every routine, the bars computed from the rows.
    import benchmarks.qr as qr_bench
    calls = []

    def fake_routines(A):
        def routine(name, fail=False):
            def fn():
                calls.append(name)
                if fail:
                    raise RuntimeError("CUDA error: an illegal memory access was encountered")
                return torch.linalg.qr(A)
            return fn
        return {"qrcp_geqp3": routine("qrcp_geqp3"), "qrcp_randomized": routine("qrcp_randomized", fail=True),
                "geqrf": routine("geqrf"), "linalg_qr": routine("linalg_qr"), "svd": routine("svd")}

    monkeypatch.setattr(qr_bench, "routines", fake_routines)
    snapshots = []

    def on_rows(rows):
        qr_bench.results_writer(tmp_path, "qr", {"gpu": "stand-in GPU"})(rows)
        snapshots.append([r["routine"] for r in json.loads((tmp_path / "qr.json").read_text())["rows"]])

    rows = qr_bench.run([(24, 24)], reps=4, warmup=1, sequential=True, progress=False, on_rows=on_rows)
    assert calls[0] == "linalg_qr" and calls.index("svd") < calls.index("qrcp_geqp3")
    assert calls.count("geqrf") == 5  # one warm-up, then one call per sample
    assert snapshots == [["linalg_qr", "geqrf", "svd", "qrcp_geqp3", "qrcp_randomized"][:i] for i in range(1, 6)]
    status = {r["routine"]: r for r in rows}
    assert status["qrcp_randomized"]["status"] == "error" and "illegal memory" in status["qrcp_randomized"]["note"]
    assert status["qrcp_geqp3"]["status"] == "ok" and status["qrcp_geqp3"]["reps"] == 4
    assert status["qrcp_geqp3"]["vs_linalg_qr"] == pytest.approx(
        status["qrcp_geqp3"]["median_ms"] / status["linalg_qr"]["median_ms"])
    bars = json.loads((tmp_path / "qr.json").read_text())["meta"]["bars"]
    assert [b["check"] for b in bars] == ["qrcp_geqp3 / linalg_qr", "qrcp_geqp3 / svd"]
    assert "GPU bar 24x24: qrcp_geqp3 / linalg_qr" in qr_bench.format_bars(bars)
    # Past the time budget, the remaining routines are reported, not run.
    late = qr_bench.run([(24, 24)], reps=2, sequential=True, progress=False, time_budget_s=0.0)
    assert {r["status"] for r in late} == {"not run"} and len(late) == 5


@pytest.mark.parametrize("args, message", [
    (["--sizes", "64", "--routines", "gqerf"], "--routines: unknown 'gqerf'; routines here: qrcp_geqp3"),
    (["--sizes", "64x"], "sizes are N or MxN with positive M, N"),
    (["--sizes", "abc"], "sizes are N or MxN"),
    (["--sizes", "64", "--reps", "0"], "--reps: must be a positive int, got '0'"),
    (["--sizes", "64", "--device", "bogus"], "--device 'bogus'"),
])
def test_qr_benchmark_refuses_bad_arguments_before_writing_anything(tmp_path, args, message):
    """A typo in --routines ran nothing, exited 0 and rewrote the results file with no rows; '64x' ran 64x64;
    --reps 0 was the default: each is now an argparse error (exit 2) and the results folder stays untouched."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.qr", *args, "--out-dir", str(tmp_path / "out")],
                          cwd=REPO, env=_env_without_interpreter(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_qr_benchmark_takes_a_truncated_routine_by_name(tmp_path, monkeypatch):
    """The names are checked against every routine, the truncated ones too (which a small matrix has none of)."""
    import benchmarks.qr as qr_bench
    monkeypatch.setattr(qr_bench, "POOL_PAUSE_S", 0.0, raising=False)
    rows = qr_bench.main(["--sizes", "64", "--routines", "qrcp_geqp3_rank64", "--reps", "1", "--warmup", "0",
                          "--out-dir", str(tmp_path)])
    assert "qrcp_geqp3_rank64" in {row["routine"] for row in rows if row.get("status") == "ok"}, rows


def test_throughput_refuses_what_it_cannot_run_and_fails_on_a_failed_section(tmp_path, monkeypatch, capsys):
    """Ranks no shape can take (every case skipped: an empty table, exit 0) and an --out it cannot write (found
    only when the first results were written, after measuring them) are argparse errors before anything runs; a
    section that fails (the QR one here) keeps what was measured and makes the exit status 1."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    small = ["--shapes", "48x32", "--tokens", "16", "--dtype", "fp32", "--providers", "frozen_linear",
             "--model-level", "off", "--no-plot", "--device", "cpu"]
    for extra, message in ((["--ranks", "100", "--out", str(tmp_path / "a")], "--ranks 100 exceeds min(out, in) of "
                                                                               "every shape (48x32)"),
                           (["--ranks", "8", "--out", str(blocker / "sub")], "cannot write there")):
        with pytest.raises(SystemExit) as exit_info:
            TP.main(small + ["--no-qr"] + extra)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
    monkeypatch.setattr(TP, "run_qr_section", lambda *a, **k: {"status": "error", "reason": "RuntimeError: boom"})
    assert TP.main(small + ["--ranks", "8", "--qr-sizes", "32x32", "--out", str(tmp_path / "b")]) == 1
    assert "failed: qr" in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "throughput.json").read_text())["rows"]  # the layer rows are kept


def test_results_meta_names_the_commit_and_the_command_as_typed(tmp_path):
    """A run rewrites its committed results before it writes its final meta: that alone is not "-dirty" (every
    committed result said so); a change elsewhere is. The command is recorded as typed (python -m ...), not with
    the module's file path, which does not run."""
    if subprocess.run(["git", "-C", str(REPO), "rev-parse"], capture_output=True).returncode != 0:
        pytest.skip("not a git work tree")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    results = sorted((clone / "benchmarks" / "results").rglob("*.json"))
    assert results, "no committed results to rewrite"
    probe = ("from benchmarks.harness import environment; e = environment(); print(e['git_commit']); "
             "print(e['command'])")

    def meta():
        out = subprocess.run([sys.executable, "-c", probe, "--flag"], cwd=clone, capture_output=True, text=True,
                             timeout=120, env=dict(_env_without_interpreter(), PYTHONPATH=str(clone)))
        return out.stdout.splitlines()
    results[0].write_text(results[0].read_text() + " ")
    commit, command = meta()
    assert not commit.endswith("-dirty") and command == f"{Path(sys.executable).name} -c {probe} --flag"
    (clone / "README.md").write_text((clone / "README.md").read_text() + " ")
    assert meta()[0].endswith("-dirty")


def test_counts_and_folders_are_checked_by_the_other_entry_points(tmp_path, capsys):
    """init_time --reps 0 / --layers 0 were silently the defaults; throughput --summary of a missing folder
    printed an empty summary and exited 0."""
    import benchmarks.init_time as IT
    for args, message in ((["--reps", "0"], "--reps: must be a positive int, got '0'"),
                          (["--layers", "0"], "--layers: must be a positive int, got '0'")):
        with pytest.raises(SystemExit) as exit_info:
            IT.main(args)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        TP.main(["--summary", str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "no such results folder" in capsys.readouterr().err
