# Sourced by the CPU benchmark scripts (bench/cpu_*.sh BUILD_DIR): sets `sy` (the CLI of the build
# given as the first argument, default ./build), `work` (a scratch folder removed on exit) and `mpi`
# (2 ranks, one per core), and writes the calibrated profile of this machine to
# "$work/profile.json": for the cluster $bench_cluster (default local-cpu) on $bench_ranks ranks
# (default 2, one per core; more oversubscribe the cores, as the runs then do; 1 calibrates without
# MPI).
build=${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/build}
sy="$build/tools/switchyard"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mpi="mpiexec -n 2"
if [ "${bench_ranks:-2}" = 1 ]; then
  "$sy" calibrate --cluster "${bench_cluster:-local-cpu}" --gpus 1 --out "$work/profile.json" \
    --no-db > /dev/null
else
  OMPI_MCA_rmaps_base_oversubscribe=1 mpiexec -n "${bench_ranks:-2}" "$sy" calibrate \
    --cluster "${bench_cluster:-local-cpu}" --gpus "${bench_ranks:-2}" \
    --out "$work/profile.json" --no-db > /dev/null
fi
