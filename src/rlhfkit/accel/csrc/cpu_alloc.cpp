/* A caching allocator for torch's large CPU tensors, built at first use by rlhfkit/accel/cpu_alloc.py
   (C++ against torch's own headers, linked to libc10) and installed with c10::SetCPUAllocator.

   Why: an RL step allocates and frees the same few hundred large blocks (activations, gradients, logits
   of each micro-batch) over and over, with sizes that change a little from step to step (the completion
   lengths). glibc serves blocks below its mmap threshold (which grows up to 32 MB as blocks are freed)
   from one heap that fragments: on the trl-peer GRPO workload at micro-batch 32 the heap reaches 275 MB
   while at most 196 MB are in use, and peak RSS climbs by about 50 MB in the first steps. A fixed low
   mmap threshold cures that but pays page faults on every allocation (0.345 s/step against 0.301).

   What: blocks of at least `threshold` bytes each get their own anonymous mapping, rounded up to a size
   class (4 KiB pages, then 8 classes per power of two: at most 12.5% rounding). A freed block goes to a
   pool instead of back to the kernel; a request takes the most recently freed pooled block of the
   smallest class that fits and is at most `slack` percent larger (the warmest in cache), else maps a new
   one. The pool holds at most `cap` bytes: beyond that the longest-unused blocks are unmapped. So the
   resident memory is what is in use plus at most `cap`, and a repeating step maps almost nothing new.
   Mappings of 2 MiB or more ask for transparent huge pages (madvise; fewer faults and TLB misses).
   Smaller requests, and frees of blocks that are not ours (made before we were installed), go to torch's
   default allocator.

   Freeing looks the pointer up (the context is the pointer itself), so raw_allocate / raw_deallocate,
   which some ATen code uses, work too. Thread-safe (one mutex) and fork-safe (pthread_atfork). Disabling
   sends new requests to the default allocator and unmaps the pool; blocks still alive are unmapped when
   they are freed. */
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <pthread.h>
#include <sys/mman.h>

#include <cstdint>
#include <list>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

struct Block {
  void* ptr;
  size_t size;
  std::list<Block*>::iterator in_lru;  // valid while pooled
};

size_t size_class(size_t n) {
  const size_t page = 4096;
  n = (n + page - 1) / page * page;
  const int k = 63 - __builtin_clzll(n);
  size_t step = (size_t{1} << k) / 8;
  if (step < page) step = page;
  return (n + step - 1) / step * step;
}

class CachingCPUAllocator final : public c10::Allocator {
 public:
  c10::Allocator* base = nullptr;  // torch's default CPU allocator
  bool enabled = true;
  size_t threshold = 256 << 10, cap = 256 << 20, slack = 50;
  bool huge = true;
  std::mutex mu;
  std::multimap<size_t, Block*> pool;        // pooled (free) blocks by size
  std::list<Block*> lru;                     // pooled blocks, least recently freed first
  std::unordered_map<void*, Block*> in_use;  // our live blocks
  // Counters (bytes, except hits and misses): reported by rlhfkit_alloc_stats.
  size_t live = 0, peak_live = 0, pooled = 0, mapped = 0, peak_mapped = 0;
  uint64_t hits = 0, misses = 0;

  c10::DataPtr allocate(size_t n) override {
    if (n < threshold || !enabled) return base->allocate(n);
    const size_t cls = size_class(n);
    Block* b = nullptr;
    {
      std::lock_guard<std::mutex> g(mu);
      auto it = pool.lower_bound(cls);
      if (it != pool.end() && it->first <= cls + cls / 100 * slack) {
        auto last = pool.upper_bound(it->first);
        --last;  // equal sizes are kept in the order they were freed: take the most recent
        b = last->second;
        pool.erase(last);
        lru.erase(b->in_lru);
        pooled -= b->size;
        hits++;
      } else {
        misses++;
      }
    }
    if (b == nullptr) {
      void* p = map(cls);
      if (p == MAP_FAILED) {  // give the pool back and try once more
        trim(0);
        p = map(cls);
      }
      TORCH_CHECK_WITH(OutOfMemoryError, p != MAP_FAILED, "rlhfkit's CPU allocator: cannot map ", cls,
                       " bytes (", n, " asked for)");
      b = new Block{p, cls, {}};
    }
    {
      std::lock_guard<std::mutex> g(mu);
      in_use.emplace(b->ptr, b);
      live += b->size;
      if (live > peak_live) peak_live = live;
    }
    return c10::DataPtr(b->ptr, b->ptr, &CachingCPUAllocator::release, c10::Device(c10::DeviceType::CPU));
  }

  void* map(size_t size) {
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return p;
    if (huge && size >= (size_t{2} << 20)) madvise(p, size, MADV_HUGEPAGE);
    std::lock_guard<std::mutex> g(mu);
    mapped += size;
    if (mapped > peak_mapped) peak_mapped = mapped;
    return p;
  }

  void unmap(const std::vector<Block*>& blocks) {
    for (Block* b : blocks) {
      munmap(b->ptr, b->size);
      delete b;
    }
  }

  // Called with mu held: take the least recently freed block out of the pool.
  Block* pop_oldest() {
    Block* o = lru.front();
    lru.pop_front();
    auto r = pool.equal_range(o->size);
    for (auto i = r.first; i != r.second; ++i) {
      if (i->second == o) {
        pool.erase(i);
        break;
      }
    }
    pooled -= o->size;
    mapped -= o->size;
    return o;
  }

  void put(void* p) {
    std::vector<Block*> drop;
    {
      std::unique_lock<std::mutex> g(mu);
      auto f = in_use.find(p);
      if (f == in_use.end()) {  // a small block, or one allocated before we were installed
        g.unlock();
        base->raw_deallocate(p);
        return;
      }
      Block* b = f->second;
      in_use.erase(f);
      live -= b->size;
      if (!enabled) {
        mapped -= b->size;
        drop.push_back(b);
      } else {
        pool.emplace(b->size, b);
        b->in_lru = lru.insert(lru.end(), b);
        pooled += b->size;
        while (pooled > cap && !lru.empty()) drop.push_back(pop_oldest());
      }
    }
    unmap(drop);
  }

  void trim(size_t keep) {
    std::vector<Block*> drop;
    {
      std::lock_guard<std::mutex> g(mu);
      while (pooled > keep && !lru.empty()) drop.push_back(pop_oldest());
    }
    unmap(drop);
  }

  static void release(void* ptr);

  c10::DeleterFnPtr raw_deleter() const override { return &CachingCPUAllocator::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

CachingCPUAllocator* g_alloc = nullptr;  // never deleted: its blocks may outlive everything else

void CachingCPUAllocator::release(void* ptr) { g_alloc->put(ptr); }

void lock_for_fork() { g_alloc->mu.lock(); }
void unlock_after_fork() { g_alloc->mu.unlock(); }

}  // namespace

extern "C" {

/* Installs the allocator (once; later calls change its settings) and enables it. Returns 1 if torch's
   CPU allocator is now ours, 0 if another allocator of higher priority is in place. */
int rlhfkit_alloc_install(int64_t threshold, int64_t cap, int64_t slack, int huge) {
  if (g_alloc == nullptr) {
    g_alloc = new CachingCPUAllocator();
    g_alloc->base = c10::GetDefaultCPUAllocator();
    pthread_atfork(lock_for_fork, unlock_after_fork, unlock_after_fork);
    c10::SetCPUAllocator(g_alloc, /*priority=*/1);
  }
  {
    std::lock_guard<std::mutex> g(g_alloc->mu);
    g_alloc->threshold = static_cast<size_t>(threshold);
    g_alloc->cap = static_cast<size_t>(cap);
    g_alloc->slack = static_cast<size_t>(slack);
    g_alloc->huge = huge != 0;
    g_alloc->enabled = true;
  }
  g_alloc->trim(g_alloc->cap);
  return c10::GetCPUAllocator() == g_alloc ? 1 : 0;
}

/* New requests go to torch's default allocator; the pool is unmapped. */
void rlhfkit_alloc_disable(void) {
  if (g_alloc == nullptr) return;
  {
    std::lock_guard<std::mutex> g(g_alloc->mu);
    g_alloc->enabled = false;
  }
  g_alloc->trim(0);
}

void rlhfkit_alloc_trim(int64_t keep) {
  if (g_alloc != nullptr) g_alloc->trim(static_cast<size_t>(keep));
}

/* out: live, peak_live, pooled, mapped, peak_mapped (bytes), hits, misses, enabled. */
void rlhfkit_alloc_stats(int64_t* out) {
  for (int i = 0; i < 8; i++) out[i] = 0;
  if (g_alloc == nullptr) return;
  std::lock_guard<std::mutex> g(g_alloc->mu);
  const CachingCPUAllocator& a = *g_alloc;
  out[0] = a.live, out[1] = a.peak_live, out[2] = a.pooled, out[3] = a.mapped, out[4] = a.peak_mapped;
  out[5] = a.hits, out[6] = a.misses, out[7] = a.enabled && c10::GetCPUAllocator() == g_alloc;
}

}  // extern "C"
