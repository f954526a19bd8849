"""The speed benchmark of the book presets against the D2L reference (`rnnlm bench`; its
--help says what it measures and how).

Per preset: our tokens/s and the D2L reference's in short rounds taken in turns, the model's
matmul FLOPs per token and the fp32 roofline measured at its own shapes, our GFLOP/s per core
against the core's own fp32 and bf16 GEMM peak (`machine_peaks`), the final perplexity of one
long run of each; then generation speed against D2L's predict_ch8. `benchmark` runs it and
writes the report into docs/benchmarks.md between its markers. `flops_per_token`,
`machine_line` and `write_section` also serve `rnnlm bench speedrun` (rnnlm.tools.speedrun).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from rnnlm.config import ConfigError, load_config
from rnnlm.config.checks import resolve_precision
from rnnlm.data.corpus import load_corpus
from rnnlm.evaluation.sampling import generate
from rnnlm.files import ensure_directory, os_reason, write_atomic
from rnnlm.kernels import native
from rnnlm.kernels.scripting import scripted
from rnnlm.models import MODEL_KINDS, build_model
from rnnlm.training.metrics import read_records
from rnnlm.training.run import train
from rnnlm.training.step import resolve_batch_shards, shard_pool, usable_cores

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT.parent / "shared" / "tools" / "d2l_reference.sh"
GEN_REPEATS = 3  # generation runs of each side, taken in turns
# The peak GEMM: large enough that packing and the edges cost nothing and the core's multiply
# units set the speed (4096: about 0.8 s per fp32 product on one Sapphire Rapids core).
PEAK_SIZE = 4096
PEAK_REPS = 3


def gates_of(kind: str) -> int:
    """The blocks stacked in W_hh's rows, as the model class declares them (1: a plain RNN)."""
    return len(MODEL_KINDS[kind].gate_names) or 1


def flops_per_token(kind: str, hidden: int, layers: int, vocab: int, inputs: int) -> float:
    """Matmul FLOPs of one training token: forward 2*G*H*(I+H) per layer + 2*H*V output,
    times 3 (forward, input gradients, weight gradients). One-hot inputs count as the dense
    matmul D2L performs, so the figure is the same for every implementation."""
    G, H = gates_of(kind), hidden
    fwd = sum(2 * G * H * ((inputs if k == 0 else H) + H) for k in range(layers)) + 2 * H * vocab
    return 3.0 * fwd


def median_seconds(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_training_steps(cfg, model, optimizer, batch_list: list, warm: int = 1) -> float:
    """Seconds the trainer's own epoch loop (rnnlm.training.epoch.train_epoch: the run's step
    in cfg's precision, clipping, the optimizer and the weight average after every step, the
    state carried) takes on the CPU with cfg's threads over `batch_list` after its first
    `warm` batches: the measurement the speed scripts share."""
    from rnnlm.training.averaging import WeightAverage
    from rnnlm.training.epoch import train_epoch
    from rnnlm.training.run import run_threads
    from rnnlm.training.step import make_batch_step

    average = WeightAverage(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
    precision = resolve_precision(cfg, torch.device("cpu"))
    marks: list[float] = []

    def step_done() -> None:
        if average is not None:
            average.update(model)
        marks.append(time.perf_counter())

    step = make_batch_step(cfg, precision)  # one lane group, with cfg's regularizers
    with run_threads(cfg.train.threads, 1):
        train_epoch(model, iter(batch_list), optimizer, cfg.train.clip_norm, True,
                    torch.device("cpu"), step=step, on_step=step_done)
    return marks[-1] - marks[warm - 1]


@scripted
def _batch_matmuls(h: torch.Tensor, w_f: torch.Tensor, w_b: torch.Tensor, dgates: torch.Tensor,
                   window_h: torch.Tensor, window_g: torch.Tensor, x_in: torch.Tensor,
                   w_in: torch.Tensor, w_out: torch.Tensor, d_out: torch.Tensor,
                   out_f: torch.Tensor, out_b: torch.Tensor, layers: int,
                   steps: int) -> list[torch.Tensor]:
    """The matmuls of one training batch, run without Python between them (TorchScript, GIL
    released), so the roofline is not lowered by Python overhead the trainer does not pay.
    Every product is returned or written to an out= buffer: TorchScript drops unused ones.
    steps=0 leaves out the per-step recurrent products (_batch_matmuls_c runs them in C)."""
    kept: list[torch.Tensor] = []
    for k in range(layers):
        inputs = x_in if k == 0 else window_h
        weights = w_in if k == 0 else w_f
        kept.append(torch.mm(inputs, weights))  # input projection of the window
        for _ in range(steps):
            torch.mm(h, w_f, out=out_f)
        for _ in range(steps):
            torch.mm(dgates, w_b, out=out_b)
        kept.append(torch.mm(window_g.t(), window_h))  # dW_hh
        kept.append(torch.mm(window_g.t(), inputs))  # dW_ih
        kept.append(torch.mm(window_g, w_b))  # d inputs
    kept.append(torch.mm(window_h, w_out))  # output layer
    kept.append(torch.mm(d_out, w_out.t()))
    kept.append(torch.mm(window_h.t(), d_out))
    return kept


def _batch_matmuls_c(h, w_f, w_b, dgates, window_h, window_g, x_in, w_in, w_out, d_out, out_f,
                     out_b, layers, steps, recurrent=None):
    """_batch_matmuls with the recurrent products the way the C window loops compute them
    (forward weights packed once per window: faster than torch.mm at some shapes).
    recurrent: (h, w_b, dgates, out_f, out_b) in float32, as the loops keep h and their sums
    (prepared once by the caller for bf16 operands); None: the float32 operands themselves."""
    kept = _batch_matmuls(h, w_f, w_b, dgates, window_h, window_g, x_in, w_in, w_out, d_out,
                          out_f, out_b, layers, 0)
    bf16 = h.dtype == torch.bfloat16
    h, w_b, dgates, out_f, out_b = recurrent or (h, w_b, dgates, out_f, out_b)
    for _ in range(layers):  # w_b (G*H, H) has W_hh's layout
        native.recurrent_products(h, w_b, out_f, dgates, out_b, steps, bf16)
    return kept


def matmul_roofline(kind: str, hidden: int, layers: int, vocab: int, batch: int, steps: int,
                    shards: int = 1, reps: int = 20, precision: str = "fp32") -> float:
    """GFLOP/s of exactly the matmuls one training batch needs, at the model's own shapes, each
    in its fastest layout: the per-step recurrent products (B, H) @ (H, G*H) forward and
    (B, G*H) @ (G*H, H) backward, and the window-wide input, output and weight-gradient GEMMs.
    shards > 1 measures the layout of train.batch_shards: each shard's lanes on its own thread
    with one intra-op thread each, all running at once. The recurrent products are timed both
    through torch.mm and as the C window loops call MKL (native.windows_available()),
    and the faster way counts. precision: the products' operands, as the run that is
    measured computes them (bf16: bf16 operands throughout, the way autocast and the C
    windows' bf16 products take them)."""
    G, H, T, V = gates_of(kind), hidden, steps, vocab
    g = torch.Generator().manual_seed(0)

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    def operands(B):
        return (rand(B, H), rand(H, G * H), rand(G * H, H), rand(B, G * H), rand(T * B, H),
                rand(T * B, G * H), rand(T * B, vocab), rand(vocab, G * H), rand(H, V),
                rand(T * B, V), torch.zeros(B, G * H, dtype=dtype),
                torch.zeros(B, H, dtype=dtype), layers, T)

    lanes = [len(part) for part in torch.arange(batch).tensor_split(shards)]
    per_shard = [operands(n) for n in lanes]
    # the C loops' recurrent operands in float32, converted here, outside the timed products
    recurrent = [None if dtype == torch.float32 else
                 tuple(ops[i].float() for i in (0, 2, 3, 10, 11)) for ops in per_shard]

    def in_torch(i: int):
        return _batch_matmuls(*per_shard[i])

    def in_c(i: int):
        return _batch_matmuls_c(*per_shard[i], recurrent=recurrent[i])

    ways = [in_torch, *([in_c] if native.windows_available() else [])]
    pool = shard_pool(shards, threads_per_shard=1) if shards > 1 else None

    def one_batch(way):  # way(shard index), on every shard at once
        if pool is None:
            return lambda: way(0)
        return lambda: list(pool.map(way, range(len(per_shard))))

    try:
        seconds = min(median_seconds(one_batch(way), reps) for way in ways)
    finally:
        if pool is not None:
            pool.shutdown()
    flops = flops_per_token(kind, H, layers, V, V) * T * batch
    return flops / seconds / 1e9


@contextmanager
def intra_op_threads(count: int):
    """torch's intra-op threads set to `count` inside the block, the caller's count after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def gemm_peak(dtype: torch.dtype, size: int = PEAK_SIZE, reps: int = PEAK_REPS) -> float:
    """GFLOP/s of one core on one square GEMM (size x size) @ (size x size) in `dtype`, the
    best of `reps` after one warm-up: the fastest this core multiplies matrices, in the
    fastest library torch has for the dtype (MKL for fp32; oneDNN for bf16, which uses AMX or
    AVX512-BF16 where the CPU has them). One intra-op thread is one core. The best, not the
    median: other processes on a shared machine can only slow a product down."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(dtype)
    b = torch.randn(size, size, generator=g).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    best = float("inf")
    with intra_op_threads(1):
        torch.mm(a, b, out=out)
        for _ in range(reps):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def machine_peaks(size: int = PEAK_SIZE, reps: int = PEAK_REPS) -> dict[str, float]:
    """The core's GEMM peak in GFLOP/s: {"fp32": ..., "bf16": ...} (gemm_peak)."""
    return {"fp32": gemm_peak(torch.float32, size, reps),
            "bf16": gemm_peak(torch.bfloat16, size, reps)}


def peak_line(peaks: dict[str, float], size: int = PEAK_SIZE, reps: int = PEAK_REPS) -> str:
    """The report's line that states the machine's peaks."""
    fp32_lib = "MKL" if torch.backends.mkl.is_available() else "torch"
    bf16_lib = "oneDNN" if torch.backends.mkldnn.is_available() else "torch"
    return (f"Peak of one core (torch.mm, one {size}x{size} product per dtype on one thread, "
            f"best of {reps}): fp32 {peaks['fp32']:,.0f} GFLOP/s ({fp32_lib}), bf16 "
            f"{peaks['bf16']:,.0f} GFLOP/s ({bf16_lib}).")


def threads_used(cfg) -> int:
    """The cores a CPU training run of `cfg` keeps busy, as it sets its threads
    (rnnlm.training.run.run_threads, step.shard_pool): train.threads intra-op threads, or
    torch's default, or one when the batch is sharded, in each of the batch shards; at most
    the cores this process may run on."""
    shards = resolve_batch_shards(cfg, torch.device("cpu"), False)
    per_shard = cfg.train.threads or (1 if shards > 1 else torch.get_num_threads())
    return max(1, min(shards * per_shard, usable_cores()))


def achieved(tokens_per_s: float, fpt: float, threads: int,
             peaks: dict[str, float] | None) -> dict:
    """Our matmul GFLOP/s per core (tokens/s x FLOPs/token over the cores the run used) and
    its fraction of each peak (None without peaks: not measured on a GPU run)."""
    per_core = tokens_per_s * fpt / threads / 1e9
    return {"threads": threads, "gflops_core": per_core,
            "of_fp32": peaks and per_core / peaks["fp32"],
            "of_bf16": peaks and per_core / peaks["bf16"]}


def run_ours(preset: str, epochs: int, warmup: int, out_root: Path, device: str,
             overrides: list[str]) -> dict:
    """Train `epochs` epochs in this process: final perplexity, and tokens/s as the median
    over the epochs after the first `warmup`."""
    out_dir = out_root / preset / str(len(list((out_root / preset).glob("*"))))
    cfg = load_config(ROOT / "configs" / f"{preset}.yaml",
                      [f"train.epochs={epochs}", f"out_dir={out_dir}",
                       f"device={device}", "train.predict_every=0", *overrides])
    with open(os.devnull, "w") as sink:
        record = train(cfg, quiet=True, out=sink)
    speeds = [record["tokens_per_s"] for record in read_records(out_dir)][warmup:]
    return {"tokens_per_s": statistics.median(speeds), "ppl": record["train_ppl"], "cfg": cfg,
            "vocab": len(load_corpus(cfg.data).vocab)}


def run_reference(preset: str, epochs: int) -> dict | None:
    if not REFERENCE.exists():
        return None
    kind = preset.removesuffix("_random")
    args = [str(REFERENCE), kind, str(epochs)] + (["random"] if preset.endswith("_random")
                                                  else [])
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  reference failed for {preset}: {proc.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    result = json.loads(proc.stdout.splitlines()[0])
    return {"tokens_per_s": result["tokens_per_s_median"], "ppl": result["ppl"]}


def applicable_settings(preset: str, settings: list[str], overrides) -> list[str]:
    """The settings ("" is the preset itself) whose overrides this preset's config accepts;
    a variant that does not apply to it (model.backward=autograd on a torch.nn layer, say) is
    named and left out of its rows, not fatal to the run."""
    kept = []
    for setting in settings:
        try:
            load_config(ROOT / "configs" / f"{preset}.yaml", overrides(setting))
        except ConfigError as e:
            if not setting:
                raise
            print(f"{preset}: variant {setting} left out: {e}", file=sys.stderr, flush=True)
            continue
        kept.append(setting)
    return kept


def paired_speeds(preset: str, settings: list[str], overrides, rounds: int, epochs: int,
                  warmup: int, out_root: Path, device: str, use_reference: bool,
                  measure_roofline=None) -> dict:
    """Tokens/s per round of each setting and of the reference ("ref"), run in turns: round
    after round, ours (each setting), the matmul roofline in GFLOP/s ("roofline", when
    `measure_roofline` is given) and then the reference, for `epochs` epochs each. This
    machine's speed drifts by tens of percent over minutes; a ratio taken within one round
    compares the two trainers (or ours and the roofline) at the same moment, and the median
    over rounds is what the table reports (with the range)."""
    speeds: dict[str, list] = {setting: [] for setting in [*settings, "roofline", "ref"]}
    for _ in range(rounds):
        for setting in settings:
            speeds[setting].append(run_ours(preset, warmup + epochs, warmup, out_root, device,
                                            overrides(setting))["tokens_per_s"])
        speeds["roofline"].append(measure_roofline() if measure_roofline else None)
        ref = run_reference(preset, epochs) if use_reference else None
        speeds["ref"].append(ref and ref["tokens_per_s"])
    return speeds


def paired_ratios(ours: list[float], other: list[float | None]) -> list[float]:
    """ours[i] / other[i] for the rounds where both were measured."""
    return [a / b for a, b in zip(ours, other) if a and b]


def value_range(values: list[float]) -> tuple[float, float] | None:
    """(lowest, highest) over rounds, or None when there is no spread to show (one round)."""
    return (min(values), max(values)) if len(values) > 1 else None


def median_or_none(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def generation_speed(num_chars: int, device: str, repeats: int = GEN_REPEATS) -> dict:
    """Characters/s of our sampler (greedy, scratch RNN h512) and of D2L's predict_ch8, each
    the median of `repeats` runs taken in turns, so that a slow moment of this shared machine
    does not fall on one side only."""
    cfg = load_config(ROOT / "configs" / "rnn_scratch.yaml", [f"device={device}"])
    corpus = load_corpus(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(corpus.vocab)).to(device)
    prefix = torch.as_tensor(corpus.vocab.encode("time traveller"))
    venv_python = Path(os.environ.get("D2L_REF_VENV", "/tmp/d2l-ref-venv")) / "bin" / "python"
    script = ROOT / "scripts" / "d2l_predict_speed.py"
    ours, refs = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        count = sum(1 for _ in generate(model, prefix, num_chars))
        ours.append(count / (time.perf_counter() - start))
        if not venv_python.exists():
            continue
        proc = subprocess.run([str(venv_python), str(script), str(num_chars),
                               str(REFERENCE.parent.parent / "data")],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"  reference predict failed: {proc.stderr.strip()[-300:]}", file=sys.stderr)
            continue
        refs.append(json.loads(proc.stdout.splitlines()[-1])["chars_per_s"])
    return {"ours": statistics.median(ours), "reference": statistics.median(refs) if refs
            else None}


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(device: str) -> str:
    text = f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
           f"{torch.get_num_threads()} intra-op threads"
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def fmt(x, spec=",.0f", missing="n/a", suffix=""):
    return missing if x is None else format(x, spec) + suffix


def check_counts(args) -> None:
    """The epoch and round counts, before minutes of training: speeds are taken over the
    epochs after the warm-up, so there must be some."""
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    if args.epochs <= args.warmup:
        raise ConfigError(f"--epochs {args.epochs} leaves no epoch after the {args.warmup} "
                          f"warm-up epochs to measure: give --epochs > --warmup")
    if args.rounds < 0 or args.round_epochs < 1 or args.gen_chars < 0:
        raise ConfigError(f"--rounds must be >= 0, --round-epochs >= 1 and --gen-chars >= 0; "
                          f"got {args.rounds}, {args.round_epochs} and {args.gen_chars}")


def benchmark(args, command: str) -> int:
    """Run the benchmark that `args` (the options of `rnnlm bench`, see
    rnnlm.commands.bench) describe, print its report and write it to args.write; `command`
    is the command line the report names."""
    check_counts(args)

    rows = []
    use_reference = not args.no_reference and args.device == "cpu"
    peaks = None
    if args.device == "cpu":  # the CPU's peak says nothing about a GPU run's speed
        print(f"the core's GEMM peak ({PEAK_SIZE}x{PEAK_SIZE}, fp32 and bf16) ...",
              file=sys.stderr, flush=True)
        peaks = machine_peaks()

    def overrides(setting: str) -> list[str]:
        return [*args.set, *(setting.split(",") if setting else [])]

    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            long = {}
            settings = applicable_settings(preset, ["", *args.variant], overrides)
            for setting in settings:
                print(f"{preset}{' with ' + setting if setting else ''}: training "
                      f"{args.epochs} epochs ...", file=sys.stderr, flush=True)
                long[setting] = run_ours(preset, args.epochs, args.warmup, Path(tmp),
                                         args.device, overrides(setting))
            ref = run_reference(preset, args.epochs) if use_reference else None
            m, d, vocab = long[""]["cfg"].model, long[""]["cfg"].data, long[""]["vocab"]
            fpt = flops_per_token(m.kind, m.hidden_size, m.num_layers, vocab, vocab)
            precision = resolve_precision(long[""]["cfg"], torch.device(args.device))

            def measure_roofline(m=m, d=d, vocab=vocab, precision=precision):
                # the better of the two ways the trainer can use the cores (one batch on all
                # threads, or one shard of lanes per core: train.batch_shards), in the
                # precision the preset computes in
                return max(matmul_roofline(m.kind, m.hidden_size, m.num_layers, vocab,
                                           d.batch_size, d.num_steps, shards=shards,
                                           precision=precision)
                           for shards in (1, 2))

            measure = measure_roofline if args.device == "cpu" else None
            if args.rounds:
                print(f"{preset}: {args.rounds} speed rounds of {args.round_epochs} epochs "
                      "each, in turns ...", file=sys.stderr, flush=True)
                speeds = paired_speeds(preset, settings, overrides, args.rounds,
                                       args.round_epochs, args.warmup, Path(tmp), args.device,
                                       use_reference, measure)
            else:  # the long runs' own speeds
                speeds = {setting: [long[setting]["tokens_per_s"]] for setting in settings}
                speeds["roofline"] = [measure and measure()]
                speeds["ref"] = [ref and ref["tokens_per_s"]]
            gflops = median_or_none(speeds["roofline"])
            roofline = None if gflops is None else gflops * 1e9 / fpt
            # our tokens/s over the roofline's, within each round: the matmul throughput
            # drifts with the machine as much as the training speed does
            roofline_speeds = [g and g * 1e9 / fpt for g in speeds["roofline"]]
            for setting in settings:
                ours = statistics.median(speeds[setting])
                ratios = paired_ratios(speeds[setting], speeds["ref"])
                fractions = paired_ratios(speeds[setting], roofline_speeds)
                rows.append({
                    "preset": preset + (f" + {setting}" if setting else ""),
                    "precision": resolve_precision(long[setting]["cfg"],
                                                   torch.device(args.device)),
                    "ours": ours, "ours_ppl": long[setting]["ppl"],
                    "ref": median_or_none(speeds["ref"]), "ref_ppl": ref and ref["ppl"],
                    "ratio": median_or_none(ratios),
                    "ratio_range": value_range(ratios),
                    "vs_preset": statistics.median(paired_ratios(speeds[setting],
                                                                 speeds[""])),
                    "mflop_per_token": fpt / 1e6, "gflops": gflops, "roofline": roofline,
                    "fraction": median_or_none(fractions),
                    "fraction_range": value_range(fractions),
                    **(achieved(ours, fpt, threads_used(long[setting]["cfg"]), peaks)
                       if args.device == "cpu" else {}),
                })
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    gen = generation_speed(args.gen_chars, args.device) if args.gen_chars else None

    lines = preset_table(rows, variants=bool(args.variant))
    speed = {r["preset"]: r["ours"] for r in rows}  # variants have longer names
    twins = [f"{kind}_scratch / {kind}: {speed[f'{kind}_scratch'] / speed[kind]:.2f}x"
             for kind in ("gru", "lstm") if f"{kind}_scratch" in speed and kind in speed]
    twin_line = ("Scratch model against its torch.nn twin of the same size (ours, tokens/s): "
                 + "; ".join(twins) + ".") if twins else ""
    gen_ratio = gen and gen["reference"] and gen["ours"] / gen["reference"]
    gen_line = gen and (
        f"Generation (scratch RNN h512, greedy, {args.gen_chars:,} characters, median "
        f"of {GEN_REPEATS} runs each, taken in turns): ours "
        f"{gen['ours']:,.0f} chars/s, D2L predict_ch8 {fmt(gen['reference'])} chars/s, "
        f"ratio {fmt(gen_ratio, '.1f', suffix='x')}.")
    if args.rounds:
        how = (f"tokens/s: median over {args.rounds} rounds in which each trainer ran "
               f"{args.round_epochs} epochs (after {args.warmup} warm-up) in turn, each round's "
               f"figure the median over its epochs; ratio: median of the per-round ratios "
               f"(range over rounds); matmul GFLOP/s: measured in every round after our "
               f"runs, median; of roofline: median of the per-round fractions (range)")
    else:
        how = f"tokens/s: median over the epochs of the long run after {args.warmup} warm-up"
    # the two kinds of limit, said apart: one library's at our shapes, the hardware's
    how += ("; precision: what train.precision resolves to here (auto: bf16 on a CPU that "
            "multiplies bf16 natively, the D2L reference computes in fp32); matmul GFLOP/s "
            "and of roofline are against what MKL and oneDNN reach on the model's own matmul "
            "shapes in that precision, one library's limit at those shapes")
    if peaks:
        how += ("; GFLOP/s per core: ours tok/s x MFLOP/token over the cores the run keeps "
                "busy (its threads, one per batch shard when sharded); of fp32 / bf16 peak: "
                "that over the core's peak above, the hardware's limit")
    report = "\n".join([
        f"Machine: {machine_line(args.device)}; device {args.device}.",
        *([peak_line(peaks)] if peaks else []),
        f"Command: `{command.strip()}` ({how}; ppl: final training perplexity after "
        f"{args.epochs} epochs, both trainers).", "", *lines,
        *[f"\n{line}" for line in (twin_line, gen_line) if line]])
    print(report)
    if args.write:
        # one section per device and set of overrides: a bf16 or compiled run keeps its own
        name = ("cpu" if args.device == "cpu" else "gpu") + "".join(
            f" {item}" for item in args.set + args.variant)
        write_section(Path(args.write), name, report)
    return 0


def preset_table(rows: list[dict], variants: bool) -> list[str]:
    """The report's markdown table, one line per row of `benchmark` (with a "vs preset"
    column when there are variants). A row without "gflops_core" (a GPU run: no CPU peak)
    shows n/a in the per-core columns."""
    header = ("| preset | precision | ours tok/s | D2L tok/s | ratio | " +
              "vs preset | " * variants +
              "MFLOP/token | matmul GFLOP/s | roofline tok/s | GFLOP/s per core | "
              "of fp32 peak | of bf16 peak | of roofline | ours ppl | D2L ppl |")
    lines = [header, "|" + "---|" * (14 + variants)]
    for r in rows:
        vs_preset = f"{r['vs_preset']:.2f}x | " if variants else ""
        spread = r["ratio_range"] and f" ({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f})"
        of_roofline = r["fraction_range"] and (f" ({100 * r['fraction_range'][0]:.0f}-"
                                               f"{100 * r['fraction_range'][1]:.0f}%)")
        of_fp32, of_bf16 = r.get("of_fp32"), r.get("of_bf16")
        lines.append(f"| {r['preset']} | {r.get('precision', 'fp32')} | {fmt(r['ours'])} | "
                     f"{fmt(r['ref'])} | "
                     f"{fmt(r['ratio'], '.2f', suffix='x')}{spread or ''} | {vs_preset}"
                     f"{r['mflop_per_token']:.2f} | "
                     f"{fmt(r['gflops'], '.0f')} | {fmt(r['roofline'])} | "
                     f"{fmt(r.get('gflops_core'), '.1f')} | "
                     f"{fmt(of_fp32 and 100 * of_fp32, '.1f', suffix='%')} | "
                     f"{fmt(of_bf16 and 100 * of_bf16, '.1f', suffix='%')} | "
                     f"{fmt(r['fraction'] and 100 * r['fraction'], '.0f', suffix='%')}"
                     f"{of_roofline or ''} | "
                     f"{r['ours_ppl']:.3f} | {fmt(r['ref_ppl'], '.3f')} |")
    return lines


def write_section(path: Path, name: str, body: str) -> None:
    """Replace the text between this section's markers (added at the end when missing), so
    the prose around the tables and the other device's table survive a new run."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    try:
        text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read --write {path}: {os_reason(exc)}") from None
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    ensure_directory(path.parent)
    write_atomic(path, text)  # a failed write leaves the page as it was
