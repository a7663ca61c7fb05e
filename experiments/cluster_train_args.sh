# Sourced by experiments/scaling.sh and experiments/wire_bytes.sh: the `int4ddp train` arguments of
# a communication experiment on the simulated cluster (fp32 layers, so only the all-reduce differs
# between modes; 64 images per rank on the synthetic set of Fashion-MNIST's shape).
# cluster_train_args CONFIG MODE STEPS METRICS_PATH CHECKPOINT_DIR: fills the array TRAIN_ARGS.
cluster_train_args() {
    TRAIN_ARGS=(train --config "$1"
        --set comm.backend=mpi --set "comm.mode=$2" --set train.batch_size=64
        --set quant.weight_bits=32 --set quant.activation_bits=32 --set quant.grad_bits=32
        --set data.dataset=synthetic --set data.synthetic_train_size=16384
        --set data.synthetic_test_size=256 --set "train.max_steps=$3"
        --set train.threads=1 --set train.checkpoint_every_epochs=0
        --set log.progress=off --set log.print_every=1 --set log.diagnostics_every=0
        --set train.overwrite=true --set "log.metrics_path=$4" --set "train.checkpoint_dir=$5")
}
