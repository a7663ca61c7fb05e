// Single- and double-buffered batch assembly (see batch_pipeline.h).
#include "src/train/batch_pipeline.h"

namespace int4ddp::train {

BatchPipeline::BatchPipeline(const data::Dataset& d, const Shape& shape,
                             const data::AugmentConfig& aug, uint64_t seed, bool double_buffered,
                             bool pinned)
    : data_(d), aug_(aug), seed_(seed), double_buffered_(double_buffered), pinned_(pinned) {
  INT4DDP_CHECK(shape.size() == 4 && shape[0] > 0, "batches: bad batch shape ", shape_str(shape));
  for (int i = 0; i < (double_buffered ? 2 : 1); ++i) {
    Slot& s = slots_[i];
    if (pinned)
      s.x.resize_pinned(shape);
    else
      s.x.resize(shape);
    s.labels.resize(static_cast<size_t>(shape[0]));
  }
}

BatchPipeline::~BatchPipeline() {
  if (pending_.valid()) pending_.wait();  // a prefetch's error, if any, ends with the run
}

BatchPipeline::Slot& BatchPipeline::take(int64_t epoch, int64_t batch, const int64_t* indices) {
  if (pending_.valid()) pending_.get();
  const int i = double_buffered_ ? 1 - current_ : 0;
  Slot& s = slots_[i];
  if (s.epoch != epoch || s.batch != batch) fill(s, epoch, batch, indices);
  current_ = i;
  return s;
}

void BatchPipeline::prefetch(int64_t epoch, int64_t batch, const int64_t* indices) {
  if (!double_buffered_) return;
  if (pending_.valid()) pending_.get();
  Slot& s = slots_[1 - current_];
  s.indices.assign(indices, indices + s.labels.size());
  s.epoch = s.batch = -1;
  pending_ = std::async(std::launch::async,
                        [this, &s, epoch, batch] { fill(s, epoch, batch, s.indices.data()); });
}

void BatchPipeline::mark_copied(Slot& s) {
  if (pinned_) s.copied.record();
}

void BatchPipeline::fill(Slot& s, int64_t epoch, int64_t batch, const int64_t* indices) {
  s.copied.wait();  // the buffer's previous batch has reached the device
  s.epoch = s.batch = -1;
  data::assemble_batch(data_, indices, static_cast<int64_t>(s.labels.size()), aug_, seed_, epoch,
                       s.x.data(), s.labels.data());
  s.epoch = epoch;
  s.batch = batch;
}

}  // namespace int4ddp::train
