// A caching CPU allocator for training (tinkerlm/tune/memory.py installs it; tinkerlm/kernels/__init__.py wraps it).
//
// A training step frees and allocates the same few large sizes over and over (activations, their gradients, the
// attention and MLP intermediates). glibc serves them from its heap, splits and merges freed blocks, and keeps what
// it cannot hand back: measured on SmolLM2-135M LoRA at 4 x 512 tokens, peak RSS 2.06 GB where the live tensors
// never pass 1.2 GB. Lowering glibc's mmap threshold returns every block but costs ~30% of the speed in page faults.
//
// Here blocks of kMinBytes and more are mmapped at a size class (powers of two in 4 steps: 256, 320, 384, 448,
// 512 KiB, ...; at most 25% over the request, and untouched tail pages are never resident) and, when freed, kept on
// their class's free list for the next request of that class only, so reuse costs no page faults and never
// fragments. Cached-but-free bytes are capped: a freed block beyond the cap, or freed while the allocator is not
// installed, is unmapped. Smaller requests go to PyTorch's default allocator. Blocks are page aligned (PyTorch and
// oneDNN want 64 bytes).
//
// Each block's DataPtr carries its own deleter, so tensors allocated before installation (and small ones) free
// through PyTorch's allocator, and this allocator's blocks come back here even after it is uninstalled.

#pragma once

#include "common.h"

#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>

#include <map>
#include <mutex>
#include <string>
#include <unordered_map>

namespace {

class CachingCPUAllocator final : public c10::Allocator {
   public:
    static constexpr size_t kMinBytes = 256 << 10;
    static constexpr uint8_t kPriority = 10;  // above the default allocator's registration (0)

    // The size class of an n-byte request (n >= kMinBytes): n rounded up to a quarter of its power of two.
    static size_t class_size(size_t n) {
        const int top = 63 - __builtin_clzll(n);
        const size_t step = size_t(1) << (top - 2);
        return (n + step - 1) / step * step;
    }

    c10::DataPtr allocate(size_t n) override {
        if (n < kMinBytes) return c10::GetDefaultCPUAllocator()->allocate(n);
        const size_t size = class_size(n);
        void* p = nullptr;
        {
            std::lock_guard<std::mutex> lock(mu_);
            auto it = free_.find(size);
            if (it != free_.end() && !it->second.empty()) {
                p = it->second.back();  // the most recently freed: likeliest still in cache
                it->second.pop_back();
                cached_ -= size;
                hits_++;
            } else {
                misses_++;
            }
        }
        if (p == nullptr) {
            p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED) {
                release();  // the cache may hold what the system lacks
                p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            }
            TORCH_CHECK_WITH(OutOfMemoryError, p != MAP_FAILED, "tinkerlm caching allocator: cannot map ", size,
                             " bytes");
        }
        int64_t live, cached;
        {
            std::lock_guard<std::mutex> lock(mu_);
            sizes_[p] = size;
            live_ += size;
            peak_ = std::max(peak_, live_);
            peak_footprint_ = std::max(peak_footprint_, live_ + cached_);
            live = live_, cached = cached_;
        }
        if (c10::memoryProfilingEnabled())
            c10::reportMemoryUsageToProfiler(p, int64_t(size), size_t(live), size_t(live + cached),
                                             c10::Device(c10::DeviceType::CPU));
        return {p, p, &free_block, c10::Device(c10::DeviceType::CPU)};
    }

    // raw_allocate's pointers may come from either path: ours are in sizes_, the rest go to PyTorch's deleter.
    c10::DeleterFnPtr raw_deleter() const override { return &free_block; }

    void copy_data(void* dest, const void* src, std::size_t count) const override {
        default_copy_data(dest, src, count);
    }

    void give_back(void* p) {
        size_t size = 0;
        bool unmap = false;
        int64_t live = 0, cached = 0;
        {
            std::lock_guard<std::mutex> lock(mu_);
            auto it = sizes_.find(p);
            if (it != sizes_.end()) {
                size = it->second;
                sizes_.erase(it);
                live_ -= size;
                unmap = !installed_ || cached_ + int64_t(size) > cap_;  // uninstalled: nothing more is cached
                if (unmap) {
                    unmaps_++;
                } else {
                    free_[size].push_back(p);
                    cached_ += size;
                }
                live = live_, cached = cached_;
            }
        }
        if (size == 0) {  // not ours: a small block from raw_allocate
            c10::GetDefaultCPUAllocator()->raw_deleter()(p);
            return;
        }
        if (unmap) munmap(p, size);
        if (c10::memoryProfilingEnabled())
            c10::reportMemoryUsageToProfiler(p, -int64_t(size), size_t(live), size_t(live + cached),
                                             c10::Device(c10::DeviceType::CPU));
    }

    // Unmaps every cached block; returns the bytes given back.
    int64_t release() {
        std::map<size_t, std::vector<void*>> lists;
        {
            std::lock_guard<std::mutex> lock(mu_);
            lists.swap(free_);
            for (auto& [size, blocks] : lists) unmaps_ += int64_t(blocks.size());
            cached_ = 0;
        }
        int64_t total = 0;
        for (auto& [size, blocks] : lists)
            for (void* p : blocks) munmap(p, size), total += int64_t(size);
        return total;
    }

    void set_installed(bool on) {
        std::lock_guard<std::mutex> lock(mu_);
        installed_ = on;
    }

    void set_cap(int64_t cap) {
        {
            std::lock_guard<std::mutex> lock(mu_);
            cap_ = cap;
            if (cached_ <= cap_) return;
        }
        release();
    }

    std::map<std::string, int64_t> stats() {
        std::lock_guard<std::mutex> lock(mu_);
        return {{"live_bytes", live_},         {"cached_bytes", cached_},
                {"peak_live_bytes", peak_},    {"peak_footprint_bytes", peak_footprint_},
                {"hits", hits_},               {"misses", misses_},
                {"unmaps", unmaps_},           {"cap_bytes", cap_},
                {"live_blocks", int64_t(sizes_.size())}};
    }

    void reset_peak() {
        std::lock_guard<std::mutex> lock(mu_);
        peak_ = live_;
        peak_footprint_ = live_ + cached_;
    }

    // The cached blocks per size class (for tests: a block is only ever listed under its own class).
    std::map<int64_t, int64_t> cached_classes() {
        std::lock_guard<std::mutex> lock(mu_);
        std::map<int64_t, int64_t> out;
        for (auto& [size, blocks] : free_)
            if (!blocks.empty()) out[int64_t(size)] = int64_t(blocks.size());
        return out;
    }

    static void free_block(void* p);

   private:
    std::mutex mu_;
    std::map<size_t, std::vector<void*>> free_;  // size class -> freed blocks of exactly that class
    std::unordered_map<void*, size_t> sizes_;    // live blocks -> their class size
    int64_t live_ = 0, cached_ = 0, peak_ = 0, peak_footprint_ = 0, hits_ = 0, misses_ = 0, unmaps_ = 0;
    int64_t cap_ = int64_t(1) << 30;
    bool installed_ = false;
};

// Never destroyed: storages keep a pointer to their allocator, and blocks may be freed at interpreter exit.
CachingCPUAllocator& caching_allocator() {
    static auto* instance = new CachingCPUAllocator();
    return *instance;
}

void CachingCPUAllocator::free_block(void* p) { caching_allocator().give_back(p); }

// Installs (or uninstalls: PyTorch's default allocator back) as the CPU allocator for tensors allocated from now on.
void alloc_install(bool enable, int64_t cap_bytes) {
    auto& a = caching_allocator();
    if (cap_bytes >= 0) a.set_cap(cap_bytes);
    a.set_installed(enable);
    c10::SetCPUAllocator(enable ? static_cast<c10::Allocator*>(&a) : c10::GetDefaultCPUAllocator(),
                         CachingCPUAllocator::kPriority);
}

bool alloc_installed() { return c10::GetCPUAllocator() == &caching_allocator(); }
int64_t alloc_release() { return caching_allocator().release(); }
std::map<std::string, int64_t> alloc_stats() { return caching_allocator().stats(); }
std::map<int64_t, int64_t> alloc_cached_classes() { return caching_allocator().cached_classes(); }
void alloc_reset_peak() { caching_allocator().reset_peak(); }

}  // namespace
