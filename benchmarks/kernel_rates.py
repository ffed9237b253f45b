"""The machine's dense rate and each model's cost: fp32 GFLOP/s of a dense matmul
(``torch.mm``, and the same product as a 1x1 convolution, which goes through oneDNN on
CPU; bf16 too where autocast is on) and the forward GFLOP per image of every backbone
(``torch.utils.flop_counter``). The other speed benchmarks report their FLOP rates as a
fraction of the dense rate they measure the same way.

    python benchmarks/kernel_rates.py
    python benchmarks/kernel_rates.py --quick --backbones conv4@16   # seconds

Rows "dense fp32" and "model" of ``benchmarks/RESULTS.md``. Options: see ``timing.py``.
"""

from __future__ import annotations

from timing import Setup, emit, run


def measure(bench: Setup) -> None:
    """The ``matmul`` record comes from :class:`Setup`; this adds the model's FLOPs."""
    emit({**bench.base, "measure": "flops", "forward_gflop_per_image":
          round(bench.fwd_flops / 1e9, 4), "out_dim": bench.new_backbone().out_dim})


def main(argv: list[str] | None = None) -> None:
    run(measure, __doc__, argv)


if __name__ == "__main__":
    main()
