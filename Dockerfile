# The streamrec image: stream worker, fine-tuner and CLI (ENTRYPOINT streamrec).
# CPU-only. The content towers are exported to ONNX at build time, so a
# container starts serving without exporting or downloading anything.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    STREAMREC_DATA_DIR=/var/lib/streamrec \
    STREAMREC_MODEL_DIR=/opt/streamrec/models \
    STREAMREC_HTTP_HOST=0.0.0.0 \
    STREAMREC_HTTP_PORT=8080

WORKDIR /opt/streamrec/src

# torch first, the CPU build, pinned by the constraints file: every later
# install then finds it satisfied and cannot pull a CUDA build (several GB).
COPY infra/constraints.txt infra/constraints.txt
RUN pip install --index-url https://download.pytorch.org/whl/cpu \
        -c infra/constraints.txt torch==2.13.0

# Then the project, under the same constraints. Sources are copied after the
# dependency layer so code edits do not reinstall torch.
COPY pyproject.toml README.md ./
COPY core core
COPY model model
COPY exporter exporter
COPY stream stream
COPY finetune finetune
COPY bench bench
COPY streamrec streamrec
RUN pip install -c infra/constraints.txt . \
    && python -c "import torch; assert not torch.cuda.is_available() and '+cpu' in torch.__version__, torch.__version__"

RUN useradd --system --uid 10001 --home-dir /var/lib/streamrec --no-create-home streamrec \
    && mkdir -p /var/lib/streamrec /opt/streamrec/models \
    && chown -R streamrec /var/lib/streamrec /opt/streamrec/models
USER streamrec

# Export the frozen text and image towers (and the rule scorer) into the model
# registry folder; a models volume mounted there starts from this content.
RUN streamrec setup

EXPOSE 8080 9108
HEALTHCHECK --interval=10s --timeout=5s --start-period=90s --retries=6 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=3)"
ENTRYPOINT ["streamrec"]
CMD ["worker"]
