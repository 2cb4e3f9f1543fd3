"""The workstation side, `edgekit compile`: ONNX intake (`intake`), calibration data (`calibration`), lowering
rewrites (`lowering`), the candidate pipeline (`pipeline`) that builds with every backend in edgekit.compilers,
measures each build against the fp32 reference (`measure`, `verdict`), keeps layers in float where int8 hurts
(`mixed`), and writes the report (`report`); `emulation` runs arm64 builds under qemu, `benchmark` times a bundle
on this machine, `synthetic` generates the example networks.

Devices never import this package: what a device shares with it (samples, self-test, manifest, bundle) lives in
edgekit itself.
"""
