"""The machine's peak rate and each model's cost: per precision (fp32, bf16), the
``kernels`` record of :class:`timing.Setup` (GFLOP/s of a dense matmul ``torch.mm``, the
same product as a 1x1 convolution, which goes through oneDNN on CPU, and a 3x3
convolution of a wide ResNet stage; the best of them is the peak), and the forward GFLOP
per image of every backbone (``torch.utils.flop_counter``). The other speed benchmarks
report their FLOP rates as a fraction of that peak in the same precision, measured the
same way.

    python benchmarks/kernel_rates.py
    python benchmarks/kernel_rates.py --quick --backbones conv4@16   # seconds

Rows "peak kernel" and "model" of ``benchmarks/RESULTS.md``. Options: see ``timing.py``.
"""

from __future__ import annotations

from timing import Setup, emit, run


def measure(bench: Setup) -> None:
    """The ``kernels`` record comes from :class:`Setup`; this adds the model's FLOPs."""
    emit({**bench.base, "measure": "flops", "forward_gflop_per_image":
          round(bench.fwd_flops / 1e9, 4), "out_dim": bench.out_dim})


def main(argv: list[str] | None = None) -> None:
    run(measure, __doc__, argv)


if __name__ == "__main__":
    main()
