// examples/uptrain/progress.hpp — gqa-uptrain's saved progress, so that a stopped run (SIGTERM, SIGKILL, a power cut)
// continues with --resume and ends with bitwise the output of an uninterrupted run.
//
// Offers (namespace uptrain::progress):
//   directory_of(output)  where OUTPUT's progress lives: ".<OUTPUT>.gqa-progress" beside it
//   Inputs, inputs_of()   what the result depends on, as (name, value) text: the input paths, digests of both
//                         checkpoints' config.json and tensors and of the calibration ids, and every option that
//                         changes the result (--steps, --batch, --window, --lr, --seed, --train, --inputs, --target;
//                         not --threads, which does not)
//   Progress              the directory, locked for the run: the layers already done, their saved tensors, and
//                         save_layer() after each new one
//
// LAYOUT. progress.json (the manifest: format, inputs, one entry per finished layer with its report and the digest of
// its tensors) and layer-<l>.safetensors (layer l's trained tensors in float32, under their checkpoint names). Each
// file is written to a temporary name, fsync'ed and renamed (gqa::detail::AtomicFile); a layer file first, then the
// manifest that names it, so a layer counts as done only once both are on disk: a kill at any moment leaves the
// previous manifest, naming only complete layer files. A layer file the manifest does not name (killed between the
// two renames) is written again; temporary files of a killed write are removed on the next open.
//
// WHY LAYERS SUFFICE. Each layer's training is self-contained: a fresh Adam, an RNG seeded from --seed and the layer
// index, the layer's problem built from the residual streams at its input. The streams are recomputed on resume
// from the saved tensors by the same per-window forward passes (bitwise thread-independent), so the state at the
// start of layer k is bitwise what an uninterrupted run had there.
//
// A fresh run (no --resume) refuses a directory that holds progress unless --force, which discards it; --resume
// with no progress directory starts at layer 1 and says so. The whole directory is removed once OUTPUT is committed.
// The manifest's inputs must equal the new run's, value for value: --resume names every one that differs.
#pragma once

#include "distill.hpp"

#include <gqa/checkpoint.hpp>
#include <gqa/safetensors.hpp>

#include <nlohmann/json.hpp>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

namespace uptrain::progress {

namespace fs = std::filesystem;

inline constexpr const char* manifest_name = "progress.json";
inline constexpr const char* format_tag = "gqa-uptrain-progress 1";

inline fs::path directory_of(const fs::path& output) {
  return output.parent_path() / ("." + output.filename().string() + ".gqa-progress");
}

/// 64-bit FNV-1a over 8-byte words (the tail bytewise): a digest to tell inputs apart, not a cryptographic one.
class Digest {
 public:
  void add(const void* data, std::size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      std::uint64_t w;
      std::memcpy(&w, p + i, 8);
      h_ = (h_ ^ w) * 0x100000001b3ULL;
    }
    for (; i < n; ++i) h_ = (h_ ^ p[i]) * 0x100000001b3ULL;
  }
  /// A string with its length first, so that ("ab", "c") and ("a", "bc") differ.
  void add(const std::string& s) {
    const std::uint64_t n = s.size();
    add(&n, sizeof n);
    add(s.data(), s.size());
  }
  std::string hex() const {
    char buf[17];
    std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h_));
    return buf;
  }

 private:
  std::uint64_t h_ = 0xcbf29ce484222325ULL;
};

/// Digest of every tensor of a checkpoint directory (names, dtypes, shapes, bytes), in file and data order.
inline std::string tensors_digest(const fs::path& dir) {
  const gqa::safetensors::Directory d = gqa::safetensors::Directory::open(dir);
  Digest h;
  for (const auto& file : d.files())
    for (const auto& t : file.tensors()) {
      h.add(t.name);
      h.add(std::string(gqa::safetensors::dtype_name(t.dtype)));
      for (const auto n : t.shape) h.add(&n, sizeof n);
      h.add(t.bytes.data(), std::size_t(t.bytes.size()));
    }
  return h.hex();
}

inline std::string file_digest(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  gqa::detail::require<gqa::io_error>(bool(in) || in.eof(), "io", "cannot read '", path.string(), "'");
  Digest h;
  h.add(bytes);
  return h.hex();
}

/// (name, value) of everything the result depends on; see the header comment.
using Inputs = std::map<std::string, std::string>;

/// What manifests compare. `options` are the result-changing options as the command line spells them.
inline Inputs inputs_of(const fs::path& original, const fs::path& converted, const fs::path& calibration,
                        const std::vector<std::int32_t>& ids, const Inputs& options) {
  Inputs in = options;
  const auto canonical = [](const fs::path& p) { return fs::weakly_canonical(fs::absolute(p)).string(); };
  in["ORIGINAL_DIR"] = canonical(original);
  in["CONVERTED_DIR"] = canonical(converted);
  in["ORIGINAL_DIR config.json digest"] = file_digest(original / "config.json");
  in["CONVERTED_DIR config.json digest"] = file_digest(converted / "config.json");
  in["ORIGINAL_DIR tensors digest"] = tensors_digest(original);
  in["CONVERTED_DIR tensors digest"] = tensors_digest(converted);
  in["--calibration"] = canonical(calibration);
  Digest h;
  h.add(ids.data(), ids.size() * sizeof(std::int32_t));
  in["calibration ids"] = std::to_string(ids.size()) + " ids, digest " + h.hex();
  return in;
}

/// The tensors of LayerWeights under their checkpoint names (the empty ones are not saved).
template <typename P, typename F>
void for_each_tensor(P& p, F&& f) {
  f("q_proj.weight", p.wq);
  f("q_proj.bias", p.bq);
  f("k_proj.weight", p.wk);
  f("k_proj.bias", p.bk);
  f("v_proj.weight", p.wv);
  f("v_proj.bias", p.bv);
  f("o_proj.weight", p.wo);
}

inline std::string weights_digest(const LayerWeights<float>& p) {
  Digest h;
  for_each_tensor(p, [&](const char* name, const auto& m) {
    h.add(std::string(name));
    h.add(m.data(), std::size_t(m.size()) * sizeof(float));
  });
  return h.hex();
}

/// A finished layer as the manifest records it.
struct SavedLayer {
  double loss_before = 0, loss_after = 0, target_power = 0, seconds = 0;
  bool exact = false, kept = false;
};

/// The progress directory of one output, locked (flock) for as long as this object lives.
class Progress {
 public:
  /// Opens (resume) or starts the progress of `output` for `inputs`. `note` receives what was found.
  Progress(const fs::path& output, Inputs inputs, bool resume, bool force, std::string& note)
      : dir_(directory_of(output)), inputs_(std::move(inputs)) {
    const bool existed = fs::exists(fs::symlink_status(dir_));
    if (existed)
      gqa::detail::require(fs::is_directory(fs::symlink_status(dir_)), "uptrain.progress", "'", dir_.string(),
            "' (gqa-uptrain's progress of ", output.string(), ") is not a directory; remove it");
    else if (::mkdir(dir_.c_str(), 0777) != 0)
      gqa::detail::throw_errno("cannot create the progress directory", dir_);
    lock();
    remove_temporaries();
    const bool has_manifest = fs::exists(dir_ / manifest_name);
    if (resume && has_manifest) {
      read_manifest();
      note = "resuming " + output.string() + ": " + std::to_string(layers_.size()) + " finished layer(s) in " +
             dir_.string();
      return;
    }
    if (has_manifest) {
      gqa::detail::require(force, "uptrain.progress", "'", dir_.string(), "' holds the progress of an earlier gqa-uptrain run of ",
            output.string(), "; pass --resume to continue it, or --force to discard it and start over");
      discard_layers();
    }
    if (resume) note = "nothing to resume in " + dir_.string() + ": starting at layer 1";
    write_manifest();
  }
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  const fs::path& directory() const { return dir_; }
  /// Layers 0 .. done()-1 are finished.
  Index done() const { return Index(layers_.size()); }
  const SavedLayer& layer(Index l) const { return layers_[size_t(l)]; }

  /// Fills p (shaped as initial_weights() makes it) with layer l's saved tensors, checking their digest.
  void load_weights(Index l, LayerWeights<float>& p) const {
    const fs::path path = layer_path(l);
    const gqa::safetensors::File f = gqa::safetensors::File::open(path);
    for_each_tensor(p, [&](const char* name, auto& m) {
      if (m.size() == 0) return;
      const std::vector<float> v = f.at(name).template to_vector<float>();
      gqa::detail::require<gqa::format_error>(Index(v.size()) == m.size(), "uptrain.progress", path.string(),
                                              ": tensor '", name, "' has ", v.size(), " values, expected ", m.size());
      std::memcpy(m.data(), v.data(), v.size() * sizeof(float));
    });
    gqa::detail::require<gqa::format_error>(weights_digest(p) == digests_[size_t(l)], "uptrain.progress",
                                            path.string(), ": its tensors do not match the digest in ",
                                            (dir_ / manifest_name).string(), "; use --force to start over");
  }

  /// Saves layer l (== done()): its tensors, then the manifest naming it.
  void save_layer(Index l, const LayerWeights<float>& p, const SavedLayer& r) {
    gqa::detail::require(l == done(), "uptrain.internal", "layer ", l, " saved after ", done(), " finished layers");
    gqa::safetensors::Writer w;
    for_each_tensor(p, [&](const char* name, const auto& m) {
      if (m.size() == 0) return;
      const bool vector = std::decay_t<decltype(m)>::RowsAtCompileTime == 1;  // a bias
      const gqa::safetensors::Shape shape = vector ? gqa::safetensors::Shape{m.size()}
                                                   : gqa::safetensors::Shape{m.rows(), m.cols()};
      w.add(name, shape, gqa::span<const float>(m.data(), m.size()));
    });
    w.write(layer_path(l));
    layers_.push_back(r);
    digests_.push_back(weights_digest(p));
    write_manifest();
  }

  /// After the output is committed: the progress is no longer needed.
  void remove() {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

 private:
  fs::path layer_path(Index l) const { return dir_ / ("layer-" + std::to_string(l) + ".safetensors"); }

  void lock() {
    const int fd = ::open((dir_ / "lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0666);
    if (fd < 0) gqa::detail::throw_errno("cannot open the lock file in", dir_);
    lock_ = gqa::detail::FileDescriptor(fd);  // a member: closed (unlocked) even when the constructor throws
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0)
      throw gqa::io_error("[gqa.uptrain.busy] another gqa-uptrain is writing '" + dir_.string() +
                          "' (it holds its lock); wait for it or stop it");
  }

  /// Temporary files of a write that was killed (AtomicFile's ".<name>.tmp-<random>").
  void remove_temporaries() const {
    for (const auto& e : fs::directory_iterator(dir_)) {
      const std::string name = e.path().filename().string();
      if (name.size() > 1 && name[0] == '.' && name.find(".tmp-") != std::string::npos) fs::remove(e.path());
    }
  }

  /// The manifest first: a kill in between leaves layer files that no manifest names, never the reverse.
  void discard_layers() const {
    fs::remove(dir_ / manifest_name);
    gqa::detail::fsync_directory(dir_);
    for (const auto& e : fs::directory_iterator(dir_))
      if (e.path().filename() != "lock") fs::remove_all(e.path());
  }

  void write_manifest() const {
    nlohmann::ordered_json j;
    j["format"] = format_tag;
    j["inputs"] = inputs_;
    j["layers"] = nlohmann::ordered_json::array();
    for (size_t l = 0; l < layers_.size(); ++l) {
      const SavedLayer& r = layers_[l];
      j["layers"].push_back({{"layer", l},
                             {"loss_before", r.loss_before},
                             {"loss_after", r.loss_after},
                             {"target_power", r.target_power},
                             {"exact", r.exact},
                             {"kept", r.kept},
                             {"seconds", r.seconds},
                             {"digest", digests_[l]}});
    }
    gqa::detail::write_file_atomically(dir_ / manifest_name, j.dump(2) + "\n");
  }

  void read_manifest() {
    const fs::path path = dir_ / manifest_name;
    const auto bad = [&](const std::string& what) {
      throw gqa::format_error("[gqa.uptrain.progress] " + path.string() + ": " + what +
                              "; use --force (without --resume) to discard it and start over");
    };
    nlohmann::json j;
    try {
      std::ifstream in(path);
      j = nlohmann::json::parse(in);
      if (j.value("format", std::string()) != format_tag) bad("\"format\" is not \"" + std::string(format_tag) + "\"");
      const Inputs saved = j.at("inputs").get<Inputs>();
      compare_inputs(saved);
      for (const auto& e : j.at("layers")) {
        if (e.at("layer").get<Index>() != Index(layers_.size())) bad("\"layers\" are not 0, 1, 2, ... in order");
        SavedLayer r;
        r.loss_before = e.at("loss_before").get<double>();
        r.loss_after = e.at("loss_after").get<double>();
        r.target_power = e.at("target_power").get<double>();
        r.exact = e.at("exact").get<bool>();
        r.kept = e.at("kept").get<bool>();
        r.seconds = e.at("seconds").get<double>();
        layers_.push_back(r);
        digests_.push_back(e.at("digest").get<std::string>());
      }
    } catch (const nlohmann::json::exception& e) {
      bad(std::string("not a progress manifest (") + e.what() + ")");
    }
  }

  /// Refuses to continue a run made with other inputs or options, naming each that differs.
  void compare_inputs(const Inputs& saved) const {
    std::string diff;
    Inputs all = saved;
    all.insert(inputs_.begin(), inputs_.end());
    for (const auto& [name, unused] : all) {
      (void)unused;
      const auto a = saved.find(name), b = inputs_.find(name);
      const std::string then = a == saved.end() ? "(none)" : a->second, now = b == inputs_.end() ? "(none)" : b->second;
      if (then != now) diff += (diff.empty() ? "" : "; ") + name + ": '" + then + "' then, '" + now + "' now";
    }
    gqa::detail::require(diff.empty(), "uptrain.resume", "--resume: the progress in '", dir_.string(),
          "' was made with other inputs or options: ", diff,
          ". Run with those, or without --resume and with --force to start over");
  }

  fs::path dir_;
  Inputs inputs_;
  std::vector<SavedLayer> layers_;
  std::vector<std::string> digests_;
  gqa::detail::FileDescriptor lock_;
};

}  // namespace uptrain::progress
