// What the trainer builds before its first step, and evaluation (internal to src/train): the
// datasets of the config, the model spec, the thread count, and the test-set evaluation shared by
// training and `int4ddp eval`.
#pragma once

#include <cstdint>

#include "comm/communicator.h"
#include "src/config/config.h"
#include "src/data/dataset.h"
#include "src/nn/model.h"

namespace int4ddp::train {

struct Datasets {
  data::Dataset train, test;
};

// The train and test splits of cfg.data, truncated to data.max_*_examples and normalised with the
// training set's statistics when data.normalize is set. Throws Error naming the key when the data
// does not fit the config (more classes than model.num_classes, fewer examples than a batch).
Datasets load_datasets(const Config& cfg);

// The model cfg describes, for inputs shaped like d's images.
nn::ModelSpec model_spec(const Config& cfg, const data::Dataset& d);

// train.threads, with 0 resolved: the cores this process may use, shared among the ranks of this
// node. A rank that mpirun bound to a subset of the machine's cores (its affinity mask is smaller
// than the machine) gets its mask; an unbound one divides the machine by the ranks on the node,
// read from OMPI_COMM_WORLD_LOCAL_SIZE (Open MPI) or MPI_LOCALNRANKS (MPICH); without either, 1.
int resolve_threads(const Config& cfg);

struct EvalResult {
  double loss = 0.0, accuracy = 0.0;
};

// Evaluates the test set; with a communicator of N ranks, rank r takes the examples i with
// i % N == r and the sums are all-reduced (every rank returns the same result).
EvalResult evaluate(nn::Model& model, const data::Dataset& d, int64_t batch,
                    comm::Communicator* comm = nullptr);

}  // namespace int4ddp::train
