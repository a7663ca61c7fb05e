# Shared by launch/run.sh and launch/test.sh: install missing Debian packages, configure and build.
# Source it; it defines int4ddp_setup and int4ddp_build.

INT4DDP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
INT4DDP_BUILD="${INT4DDP_BUILD:-$INT4DDP_ROOT/build}"
INT4DDP_PACKAGES=(build-essential cmake pkg-config libeigen3-dev libyaml-cpp-dev libgtest-dev
                  libgmock-dev libbenchmark-dev libcli11-dev libopenmpi-dev openmpi-bin
                  nlohmann-json3-dev zlib1g-dev libfmt-dev)

# int4ddp_setup [extra packages...]: apt-get install whatever is missing (needs root or sudo).
int4ddp_setup() {
    local want=("${INT4DDP_PACKAGES[@]}" "$@") missing=() p
    for p in "${want[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        return 0
    fi
    echo "int4ddp: installing missing packages: ${missing[*]}"
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo)
        else
            echo "int4ddp: error: need root or sudo to install: ${missing[*]}" >&2
            return 1
        fi
    fi
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}"
}

# int4ddp_build [cmake args...]: configure (once) and build everything.
int4ddp_build() {
    if [ -d /usr/local/cuda/bin ] && ! command -v nvcc >/dev/null 2>&1; then
        export PATH="/usr/local/cuda/bin:$PATH"
    fi
    local jobs
    jobs="$(nproc 2>/dev/null || echo 2)"
    # The launch scripts build for the machine they run on, so INT4DDP_NATIVE (-march=native) is
    # safe here and makes Eigen's GEMMs use AVX2/AVX-512 (1.7x training throughput measured).
    cmake -S "$INT4DDP_ROOT" -B "$INT4DDP_BUILD" -DCMAKE_BUILD_TYPE=Release \
        -DINT4DDP_NATIVE="${INT4DDP_NATIVE:-ON}" "$@"
    cmake --build "$INT4DDP_BUILD" -j "$jobs" ${INT4DDP_TARGETS:+--target $INT4DDP_TARGETS}
}
