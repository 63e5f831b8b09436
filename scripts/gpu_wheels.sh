#!/usr/bin/env bash
# Fill .whl/ with what the GPU machine lacks, under the device tool's 64 MiB carry limit: the shared set
# (../shared/tools/gpu-wheels.sh: trl, datasets, bitsandbytes, liger-kernel), the monitoring packages the recipe
# tests need (tensorboard, wandb and their dependencies), and bitsandbytes trimmed to the CPU and CUDA 13.x
# libraries (the GPU image's torch is cu130; the full wheel carries 43 MB of libraries for other CUDA and ROCm).
# scripts/install_wheels.py installs them there, skipping packages the image already has.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ../shared/tools/gpu-wheels.sh > /dev/null
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
    --platform any -d .whl "$@"
}
download tensorboard==2.21.0 tensorboard-data-server==0.7.2 grpcio==1.85.3 absl-py==2.5.1 Markdown==3.11.3 \
  Werkzeug==3.1.9 protobuf==7.36.2 wandb==0.31.0 click==8.5.1 cwevals==0.0.1b1 platformdirs==4.14.8 \
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 \
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2 \
  opentelemetry-semantic-conventions==0.66b2 opentelemetry-exporter-otlp-proto-http==1.45.2 \
  opentelemetry-exporter-otlp-proto-common==1.45.2 opentelemetry-exporter-http-transport==0.66b2 \
  opentelemetry-exporter-otlp-common==0.66b2 googleapis-common-protos==1.76.0 requests==2.34.2 \
  anyio httpx httpcore h11 sniffio distro
# a sampling profiler for the host side of a training step (bench/README.md)
download py-spy==0.4.3
python3 - <<'PY'
import csv, io, zipfile
from pathlib import Path
for wheel in Path(".whl").glob("bitsandbytes-*.whl"):
    with zipfile.ZipFile(wheel) as src:
        keep = [i for i in src.infolist() if not (i.filename.endswith(".so") and "cpu" not in i.filename
                                                   and "cuda13" not in i.filename)]
        if len(keep) == len(src.infolist()):
            continue
        names = {i.filename for i in keep}
        slim = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in keep:
                data = src.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    rows = [r for r in csv.reader(io.StringIO(data.decode())) if r and r[0] in names]
                    buf = io.StringIO()
                    csv.writer(buf, lineterminator="\n").writerows(rows)
                    data = buf.getvalue().encode()
                dst.writestr(info, data)
    slim.replace(wheel)
PY
du -sh .whl
