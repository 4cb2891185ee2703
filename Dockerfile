# xdlabel: API and worker image. CPU by default; for CUDA:
#   docker build --build-arg VARIANT=gpu -t xdlabel:gpu .
ARG PYTHON=3.11
FROM python:${PYTHON}-slim

ARG VARIANT=cpu
# torch wheels: the CPU build by default; the GPU variant takes PyPI's CUDA build and faiss-gpu.
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    XDLABEL_DATA_DIR=/data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY xdecoder ./xdecoder
COPY xdlabel ./xdlabel
COPY index ./index
COPY annotator ./annotator
COPY migrations ./migrations
COPY alembic.ini ./

RUN if [ "$VARIANT" = "gpu" ]; then \
        pip install "torch==${TORCH_VERSION}" && pip install . && \
        pip uninstall -y faiss-cpu && pip install faiss-gpu-cu12; \
    else \
        pip install --index-url "${TORCH_CPU_INDEX}" "torch==${TORCH_VERSION}" && pip install .; \
    fi

VOLUME ["/data"]
EXPOSE 8000
# Checkpoint: mount it and set XDLABEL_CHECKPOINT (or hf://xdecoder/X-Decoder/xdecoder_focalt_last.pt).
CMD ["xdlabel", "serve", "--host", "0.0.0.0", "--port", "8000"]
