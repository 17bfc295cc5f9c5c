"""Scale: the DiT prior at the official widths, its cost per evaluation and the memory plan.

A DiT of the official widths (2048 wide, 16 heads x 128, MLP ratio 4, latent d = 16, block
16: the exact trace takes 16 x 16 = 256 vector-Jacobian products per evaluation) with
``--layers`` layers instead of 24 and random weights (PyTorch's default initialisation, seed
0), on one sequence in the 2L layout over a cached clean history, as an ODE solve evaluates
it. Per sequence length, the median time of one evaluation of

* the velocity (no graph);
* one Hutchinson probe: the velocity with its graph and one vector-Jacobian product;
* the exact trace: the velocity and ``--vjps`` of the 256 one-hot VJPs, ``--vjp-chunk`` per
  batched backward pass (on CPU the default times 32 of them; the full evaluation is then
  extrapolated as ``velocity + (256 / vjps) (exact - velocity)``, and said so);

and the peak memory one evaluation adds (CPU: growth of the peak resident size, Linux only;
CUDA: ``max_memory_allocated``). The 24-layer figures are an extrapolation: ``24 / layers``
times the measured ones (the layers are nearly all of the cost).

``--reference PATH`` runs the DiT of another checkout (its ``colaprob/dit.py`` with its
``colaprob/attention.py``; everything else is this checkout's) on the same weights and
inputs, interleaved with this one: time ratios (this / reference) and the largest relative
difference of the values.

On CUDA the new code also runs with TF32 and with bfloat16 matmuls (autocast), each with its
difference from float32 on the same inputs: the divergence (the log-density's integrand, in
nats per unit time) and the velocity.

Last, the memory plan (``colaprob.memory.plan``) of a 24-layer official-size checkpoint (VAE
1536 wide, built on the meta device) for the CLI's defaults (8 documents, K = 16, chunk 32,
VJP chunk 32) under a few budgets.

    python bench/scale.py                          # CPU, 2 layers, 64 and 256 positions
    python bench/scale.py --reference /path/to/older/checkout
    python bench/scale.py --quick
"""

from __future__ import annotations

from pathlib import Path

import torch

import common
from colaprob import memory
from colaprob.config import DiTConfig, VAEConfig
from colaprob.dit import DiT
from colaprob.errors import ColaprobError
from colaprob.estimators.cnf import _jacobian_diagonal, _vjp

OFFICIAL = dict(txt_in_channels=16, txt_out_channels=16, txt_dim=2048, emb_dim=2048, heads=16, head_dim=128, expand_ratio=4, rope_dim=96, block_size=16)
QUICK = dict(txt_in_channels=4, txt_out_channels=4, txt_dim=64, emb_dim=64, heads=2, head_dim=32, expand_ratio=2, rope_dim=16, block_size=4)


class Case:
    """One DiT on one sequence of ``L`` positions: clean and noisy latents, the clean history,
    ``tau`` = 1000 t on every noisy row, the exact trace's colours and one Rademacher probe."""

    def __init__(self, dit, L: int, device, seed: int = 0):
        c = dit.config
        g = torch.Generator().manual_seed(seed)
        d, bs = c.txt_in_channels, c.block_size
        self.dit, self.bs = dit, bs
        self.clean = torch.randn(1, L, d, generator=g).to(device)
        self.noisy = torch.randn(1, L, d, generator=g).to(device)
        self.tau = torch.full((1, L), 1000 * 0.37, device=device)
        self.probe = (torch.randint(0, 2, (1, 1, L, d), generator=g) * 2.0 - 1).to(device)
        self.colours = ((torch.arange(L, device=device) % bs)[:, None] * d + torch.arange(d, device=device))  # [L, d]
        with torch.no_grad():
            self.history = dit.clean_history(self.clean, bs)

    def _field(self, z):
        return self.dit.velocity_2l(self.clean, z, self.tau, self.bs, self.history)

    def velocity(self):
        with torch.no_grad():
            return self._field(self.noisy)

    def hutchinson(self):
        z = self.noisy.clone().requires_grad_(True)
        v = self._field(z)
        return (self.probe * _vjp(v, z, self.probe)).sum().detach()

    def exact(self, vjps: int, chunk: int):
        z = self.noisy.clone().requires_grad_(True)
        v = self._field(z)
        return _jacobian_diagonal(v, z, self.colours, vjps, chunk).detach()


def peak_growth(fn, device) -> float | None:
    """MiB one call of ``fn`` adds to the peak memory (None where it cannot be measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak resident size starts again from now
        status = lambda field: next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))
        before = status("VmRSS")
        fn()
        return (status("VmHWM") - before) / 2**20
    except (OSError, StopIteration):
        return None


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| over the largest |b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def synchronised(fn, device):
    def call():
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    return call


def measure(args, dit: DiT, label: str, lengths: list[int], vjps: int | None, extrapolate: bool, device) -> None:
    config = dit.config
    models = {"new": dit.to(device).eval()}
    if args.reference:
        models["today"] = common.reference_dit(Path(args.reference))(config).to(device).eval()
        models["today"].load_state_dict(models["new"].state_dict())
    n_colours = config.block_size * config.txt_in_channels
    vjps = min(vjps or n_colours, n_colours)
    scale = args.official_layers / config.num_layers
    rows = []
    for L in lengths:
        cases = {name: Case(dit, L, device) for name, dit in models.items()}
        tasks = {
            "velocity": lambda case: case.velocity(),
            "hutchinson": lambda case: case.hutchinson(),
            "exact": lambda case: case.exact(vjps, args.vjp_chunk),
        }
        for task, run in tasks.items():
            variants = {name: synchronised(lambda case=case, run=run: run(case), device) for name, case in cases.items()}
            timings = common.interleaved(variants, args.repeats, warmup=device.type == "cuda")
            for name, timing in timings.items():
                seconds = timing.wall_median if device.type == "cuda" else timing.median
                row = {"positions": L, "evaluation": task, "code": name, "s": seconds}
                row["MiB"] = peak_growth(variants[name], device)
                if task == "exact" and vjps < n_colours:
                    velocity = next(r["s"] for r in rows if r["positions"] == L and r["evaluation"] == "velocity" and r["code"] == name)
                    row["s all VJPs"] = velocity + (n_colours / vjps) * (seconds - velocity)
                else:
                    row["s all VJPs"] = seconds if task == "exact" else None
                if extrapolate:
                    row[f"s at {args.official_layers} layers (extrapolated)"] = scale * (row["s all VJPs"] if task == "exact" else seconds)
                if name == "new" and "today" in timings:
                    row["new/today time"] = seconds / (timings["today"].wall_median if device.type == "cuda" else timings["today"].median)
                    row["rel diff vs today"] = relative(timing.result, timings["today"].result)
                rows.append(row)
    print(f"One evaluation, {label}: DiT {config.num_layers} layers x width {config.txt_dim} ({config.heads} heads x {config.head_dim}, "
          f"MLP x{config.expand_ratio}), latent d = {config.txt_in_channels}, block {config.block_size}, on {device}; "
          f"exact trace: {vjps} of its {n_colours} VJPs timed, {args.vjp_chunk} per backward pass"
          + (" ('s all VJPs' extrapolates to all of them)" if vjps < n_colours else "") + ".")
    print()
    columns = list(dict.fromkeys(k for r in rows for k in r))
    common.table(columns, [[r.get(c) for c in columns] for r in rows])
    if device.type == "cuda" and extrapolate:
        precisions(args, models["new"], lengths, device, vjps)


def precisions(args, dit, lengths: list[int], device, vjps: int) -> None:
    """TF32 and bf16 matmuls against float32 on the same inputs."""
    rows = []
    for L in lengths:
        case = Case(dit, L, device)

        def run(mode):
            torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "bf16"):
                out = {"velocity": case.velocity(), "exact": case.exact(vjps, args.vjp_chunk)}
            torch.cuda.synchronize()
            return out

        variants = {mode: (lambda mode=mode: run(mode)) for mode in ("float32", "tf32", "bf16")}
        timings = common.interleaved(variants, args.repeats, warmup=True)
        base = timings["float32"].result
        for mode, timing in timings.items():
            out = timing.result
            rows.append({
                "positions": L,
                "matmuls": mode,
                "wall s (velocity + exact)": timing.wall_median,
                "/float32 time": timing.wall_median / timings["float32"].wall_median,
                "divergence err nats/unit t": (out["exact"].double().sum() - base["exact"].double().sum()).abs().item(),
                "velocity rel err": relative(out["velocity"], base["velocity"]),
            })
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"Matmul precision on {device} (exact trace over {vjps} VJPs; errors against float32 on the same inputs):")
    print()
    columns = list(rows[0])
    common.table(columns, [[r.get(c) for c in columns] for r in rows])


def plans(args, config: DiTConfig, device) -> None:
    """The memory plan of an official-size checkpoint for the CLI's default settings."""
    from colaprob.model import ColaModel
    from colaprob.tokenizer import byte_level_tokenizer

    vae = VAEConfig() if not args.quick else VAEConfig(vocab_size=300, dim=64, ffn_dim=128, num_heads=2, latent_dim=config.txt_in_channels, encoder_num_blocks=1, decoder_num_blocks=1)
    dit = DiTConfig(**{**(QUICK if args.quick else OFFICIAL), "num_layers": 1 if args.quick else args.official_layers})
    with torch.device("meta"):  # shapes only: no weights are allocated
        model = ColaModel(vae, dit, byte_level_tokenizer())
    free = memory.available_bytes(device)
    budgets = {"8 GiB": 8 << 30, "80 GiB": 80 << 30} | ({f"free here ({memory.human(free)})": free} if free else {})
    rows = []
    for tokens in args.lengths:
        for probes in (None, 1):
            request = memory.Request(batch=8, tokens=tokens, samples=16, chunk=32, probes=probes, vjp_chunk=32)
            unplanned = memory.peak_bytes(model, memory.Workload(8, tokens, 16, probes, 32))
            for label, budget in budgets.items():
                try:
                    chosen = memory.plan(model, request, budget)
                    settings = [chosen.batch, chosen.chunk, chosen.vjp_chunk, memory.human(chosen.peak_bytes)]
                except ColaprobError as refusal:  # shown as what a run would print
                    settings = ["refused", "", "", str(refusal)[:60] + "..."]
                rows.append([tokens, "exact" if probes is None else "hutchinson 1", memory.human(unplanned), label, *settings])
    print(f"Memory plan, {dit.num_layers}-layer DiT x {dit.txt_dim} with a VAE {vae.dim} wide (vocabulary {vae.vocab_size}), "
          "for --batch-size 8, K = 16, --chunk-size 32, VJP chunk 32 (estimates of the order of the peak, colaprob.memory):")
    print()
    common.table(["tokens", "trace", "estimate unplanned", "budget", "batch", "chunk", "vjp chunk", "planned estimate"], rows)


def main(argv=None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2, help="DiT layers built (default 2; the official model has 24)")
    p.add_argument("--official-layers", type=int, default=24, help="layers the extrapolation is to (default 24)")
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 256], help="latent positions (default 64 256)")
    p.add_argument("--vjps", type=int, default=None, help="exact-trace VJPs timed (default: 32 on CPU, all 256 on CUDA)")
    p.add_argument("--vjp-chunk", type=int, default=32, help="VJPs per batched backward pass (default 32)")
    p.add_argument("--reference", default=None, help="a checkout whose DiT runs beside this one's (e.g. the main branch)")
    p.add_argument("--embedded-lengths", type=int, nargs="*", default=[32, 128], help="latent positions for the embedded model (trained weights; none: skip it)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    common.start(args, "Scale: official widths")
    device = torch.device(args.device)
    if args.quick:
        args.lengths, args.layers, args.embedded_lengths = [8], 1, [8]
    config = DiTConfig(**{**(QUICK if args.quick else OFFICIAL), "num_layers": args.layers})
    if args.vjps is None and device.type == "cpu" and not args.quick:
        args.vjps = 32
    torch.manual_seed(0)
    label = "tiny widths (--quick), random weights" if args.quick else "official widths, random weights"
    measure(args, DiT(config), label, args.lengths, args.vjps, True, device)
    if args.embedded_lengths:
        import colaprob

        measure(args, colaprob.load("tiny").dit, "the embedded model (tiny, trained weights)", args.embedded_lengths, None, False, device)
    plans(args, config, device)
    common.finish()


if __name__ == "__main__":
    main()
