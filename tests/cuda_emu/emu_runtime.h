// A CPU emulation of one CUDA thread block, for testing the attention kernels on a
// machine without a GPU (tests/test_cuda_attention.py builds it with g++).
//
// Each CUDA thread of a block is a fiber (ucontext) in one OS thread; the scheduler
// runs them round-robin (or lets one warp run ahead: FBEMU_SCHEDULE, see run_block) and
// switches only at warp or block barriers, so the kernel code runs unchanged as plain C++. The warp-level primitives of attention.cuh
// (ldmatrix, mma.sync m16n8k16, shfl.xor, cp.async) are emulated element by element
// from the PTX ISA's definitions, so the fragment bookkeeping of the kernels is
// checked against an independent statement of the layouts.
//
// What else it checks, per block:
//   * cp.async copies land only at cp.async.wait_group (as late as the hardware may
//     land them), so a read before the wait sees stale (NaN-poisoned) shared memory;
//   * a shadow of shared memory (16-byte chunks) flags races between cp.async writes
//     and ldmatrix reads of different threads with no barrier in between (RAW / WAR),
//     reads of chunks with a copy in flight, and two copies in flight into one chunk;
//   * every ldmatrix / cp.async address lies inside the block's dynamic shared memory
//     and is 16-byte aligned; guard bytes after it catch plain out-of-range writes;
//   * deadlocks (a barrier some threads never reach) and copies in flight at exit.
// It does not model timing, memory ordering of plain global/shared accesses, or
// register pressure, and its fp32 accumulation order differs from the tensor cores'.
#pragma once

#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <cuda_runtime.h>  // dim3, uint4 (host declarations only)
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace emu {

constexpr int kMaxWarps = 32;
constexpr size_t kStackBytes = 512 * 1024;
constexpr size_t kGuardBytes = 256;

struct Copy {
    unsigned char* dst;
    const unsigned char* src;
    bool valid;
};

struct Thread {
    ucontext_t ctx;
    std::vector<char> stack;
    bool done = false;
    int wait = 0;  // 0: runnable; 1: at a warp barrier; 2: at a block barrier
    uint64_t wait_gen = 0;
    int epoch = 0;  // block barriers passed
    std::vector<Copy> open;                 // cp.async issued, not yet committed
    std::deque<std::vector<Copy>> groups;   // committed groups not yet completed
};

struct Chunk {  // shadow of one 16-byte chunk of shared memory
    bool pending = false;   // a cp.async into it is in flight
    int writer = -1;
    int write_done_epoch = -1;
    int read_epoch = -1;
    int reader = -1;
    bool many_readers = false;
};

struct Block {
    dim3 block_idx, grid_dim, block_dim;
    int nthreads = 0;
    std::vector<Thread> threads;
    ucontext_t sched;
    int current = -1;
    int block_arrived = 0;
    uint64_t block_gen = 0;
    int warp_arrived[kMaxWarps] = {};
    uint64_t warp_gen[kMaxWarps] = {};
    const void* ptr_slot[kMaxWarps][32];
    float f_slot[kMaxWarps][32];
    uint32_t a_slot[kMaxWarps][32][4];
    uint32_t b_slot[kMaxWarps][32][2];
    std::vector<unsigned char> smem;  // dynamic shared memory + guard bytes
    size_t smem_bytes = 0;
    std::vector<Chunk> shadow;
    std::function<void()> body;
    std::vector<std::string> errors;
};

inline Block*& current_block() {
    static thread_local Block* block = nullptr;
    return block;
}

inline void error(Block& b, const std::string& what) {
    if (b.errors.size() < 8) {
        b.errors.push_back(what + " [thread " + std::to_string(b.current) + ", block (" +
                           std::to_string(b.block_idx.x) + ", " + std::to_string(b.block_idx.y) + ")]");
    }
}

inline dim3 thread_idx() { return dim3(static_cast<unsigned>(current_block()->current), 1, 1); }
inline dim3 block_idx() { return current_block()->block_idx; }
inline dim3 grid_dim() { return current_block()->grid_dim; }
inline dim3 block_dim() { return current_block()->block_dim; }

// ----------------------------------------------------------------- scheduling

inline void yield(Block& b) {
    Thread& t = b.threads[b.current];
    swapcontext(&t.ctx, &b.sched);
}

inline void warp_barrier() {
    Block& b = *current_block();
    Thread& t = b.threads[b.current];
    const int w = b.current / 32;
    t.wait = 1;
    t.wait_gen = b.warp_gen[w];
    if (++b.warp_arrived[w] == 32) {
        b.warp_arrived[w] = 0;
        ++b.warp_gen[w];
    }
    yield(b);
    t.wait = 0;
}

inline void block_barrier() {
    Block& b = *current_block();
    Thread& t = b.threads[b.current];
    t.wait = 2;
    t.wait_gen = b.block_gen;
    if (++b.block_arrived == b.nthreads) {
        b.block_arrived = 0;
        ++b.block_gen;
    }
    yield(b);
    t.wait = 0;
    ++t.epoch;
}

inline bool runnable(const Block& b, int i) {
    const Thread& t = b.threads[i];
    if (t.done) return false;
    if (t.wait == 0) return true;
    if (t.wait == 1) return b.warp_gen[i / 32] != t.wait_gen;
    return b.block_gen != t.wait_gen;
}

inline void fiber_entry(int i) {
    Block& b = *current_block();
    b.body();
    Thread& t = b.threads[i];
    if (!t.open.empty() || !t.groups.empty()) error(b, "cp.async still in flight when the thread exits");
    t.done = true;  // returns to b.sched through uc_link
}

inline void run_block(Block& b) {
    current_block() = &b;
    b.threads.resize(b.nthreads);
    for (int i = 0; i < b.nthreads; ++i) {
        Thread& t = b.threads[i];
        t.stack.resize(kStackBytes);
        getcontext(&t.ctx);
        t.ctx.uc_stack.ss_sp = t.stack.data();
        t.ctx.uc_stack.ss_size = t.stack.size();
        t.ctx.uc_link = &b.sched;
        makecontext(&t.ctx, reinterpret_cast<void (*)()>(fiber_entry), 1, i);
    }
    // FBEMU_SCHEDULE (as the LayerNorm/GELU/span emulation in tests/test_cuda_build.py): ""
    // round robin, where every warp moves one collective a pass, in step with the others, so a
    // missing barrier between one warp's shared-memory writes and another's reads goes unseen;
    // "greedy" / "greedy_desc": after each yield the first runnable thread in ascending /
    // descending order runs again, so one warp runs as far ahead as the barriers let it.
    const char* schedule = std::getenv("FBEMU_SCHEDULE");
    const bool greedy = schedule && std::strncmp(schedule, "greedy", 6) == 0;
    const bool descending = schedule && std::strcmp(schedule, "greedy_desc") == 0;
    for (;;) {
        bool all_done = true, progress = false;
        for (int k = 0; k < b.nthreads; ++k) {
            const int i = descending ? b.nthreads - 1 - k : k;
            if (b.threads[i].done) continue;
            all_done = false;
            if (!runnable(b, i)) continue;
            b.current = i;
            swapcontext(&b.sched, &b.threads[i].ctx);
            progress = true;
            if (greedy) break;
        }
        if (all_done) break;
        if (!progress) {
            b.current = -1;
            error(b, "deadlock: some threads wait at a barrier that the others never reach");
            break;
        }
    }
    current_block() = nullptr;
}

// Run `body` (one call = one CUDA thread) over the grid, one block at a time.
inline void run_grid(dim3 grid, int nthreads, size_t smem_bytes, const std::function<void()>& body,
                     const std::string& name) {
    for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
            Block b;
            b.block_idx = dim3(x, y, 0);
            b.grid_dim = grid;
            b.block_dim = dim3(nthreads, 1, 1);
            b.nthreads = nthreads;
            b.smem_bytes = smem_bytes;
            b.smem.assign(smem_bytes + kGuardBytes, 0xA5);
            std::memset(b.smem.data(), 0xFF, smem_bytes);  // NaN in fp16, bf16 and fp32
            b.shadow.assign((smem_bytes + 15) / 16, Chunk{});
            b.body = body;
            run_block(b);
            for (size_t i = smem_bytes; i < b.smem.size(); ++i) {
                if (b.smem[i] != 0xA5) {
                    error(b, "write past the end of dynamic shared memory (offset " + std::to_string(i) + ")");
                    break;
                }
            }
            if (!b.errors.empty()) {
                std::string msg = name + ": " + b.errors[0];
                for (size_t e = 1; e < b.errors.size(); ++e) msg += "; " + b.errors[e];
                throw std::runtime_error(msg);
            }
        }
    }
}

// ----------------------------------------------------------------- shared memory shadow

inline bool smem_range(Block& b, const void* p, size_t n, size_t* chunk) {
    const auto* c = static_cast<const unsigned char*>(p);
    if (c < b.smem.data() || c + n > b.smem.data() + b.smem_bytes) return false;
    *chunk = static_cast<size_t>(c - b.smem.data()) / 16;
    return true;
}

// An ldmatrix row (16 bytes) read by the current thread.
inline bool smem_read16(Block& b, const void* p) {
    size_t idx;
    if (!smem_range(b, p, 16, &idx) || (reinterpret_cast<uintptr_t>(p) & 15)) {
        error(b, "ldmatrix address outside dynamic shared memory or not 16-byte aligned");
        return false;
    }
    Chunk& c = b.shadow[idx];
    const int tid = b.current;
    const int e = b.threads[tid].epoch;
    if (c.pending) {
        error(b, "ldmatrix reads shared memory (offset " + std::to_string(idx * 16) +
                     ") while a cp.async of thread " + std::to_string(c.writer) + " into it is in flight");
    } else if (c.write_done_epoch == e && c.writer != tid) {
        error(b, "race: ldmatrix reads shared memory (offset " + std::to_string(idx * 16) +
                     ") that thread " + std::to_string(c.writer) + " filled with no barrier in between");
    }
    if (c.read_epoch != e) {
        c.read_epoch = e;
        c.reader = tid;
        c.many_readers = false;
    } else if (c.reader != tid) {
        c.many_readers = true;
    }
    return true;
}

inline void cp_async_16(void* dst, const void* src, bool valid) {
    Block& b = *current_block();
    Thread& t = b.threads[b.current];
    size_t idx;
    if (!smem_range(b, dst, 16, &idx) || (reinterpret_cast<uintptr_t>(dst) & 15)) {
        error(b, "cp.async destination outside dynamic shared memory or not 16-byte aligned");
        return;
    }
    if (valid && (reinterpret_cast<uintptr_t>(src) & 15)) error(b, "cp.async source not 16-byte aligned");
    Chunk& c = b.shadow[idx];
    const int e = t.epoch;
    if (c.read_epoch == e && (c.many_readers || c.reader != b.current)) {
        error(b, "race: cp.async overwrites shared memory (offset " + std::to_string(idx * 16) +
                     ") that other threads read since the last barrier");
    }
    if (c.pending) error(b, "two cp.async into one shared-memory chunk in flight");
    c.pending = true;
    c.writer = b.current;
    t.open.push_back({static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), valid});
}

inline void cp_async_commit() {
    Block& b = *current_block();
    Thread& t = b.threads[b.current];
    t.groups.push_back(std::move(t.open));
    t.open.clear();
}

inline void cp_async_wait(size_t n) {
    Block& b = *current_block();
    Thread& t = b.threads[b.current];
    while (t.groups.size() > n) {
        for (const Copy& cp : t.groups.front()) {
            if (cp.valid) {
                std::memcpy(cp.dst, cp.src, 16);
            } else {
                std::memset(cp.dst, 0, 16);
            }
            size_t idx;
            smem_range(b, cp.dst, 16, &idx);
            b.shadow[idx].pending = false;
            b.shadow[idx].write_done_epoch = t.epoch;
        }
        t.groups.pop_front();
    }
}

// ----------------------------------------------------------------- warp collectives

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row_ptr, bool trans) {
    Block& b = *current_block();
    const int w = b.current / 32, lane = b.current % 32;
    b.ptr_slot[w][lane] = smem_read16(b, row_ptr) ? row_ptr : nullptr;
    warp_barrier();
    for (int m = 0; m < 4; ++m) {
        uint16_t lo = 0xFFFF, hi = 0xFFFF;
        if (!trans) {  // row lane/4, columns 2(lane%4), +1 of matrix m
            const auto* row = static_cast<const uint16_t*>(b.ptr_slot[w][8 * m + lane / 4]);
            if (row != nullptr) {
                lo = row[2 * (lane % 4)];
                hi = row[2 * (lane % 4) + 1];
            }
        } else {       // column lane/4, rows 2(lane%4), +1 of matrix m
            const auto* r0 = static_cast<const uint16_t*>(b.ptr_slot[w][8 * m + 2 * (lane % 4)]);
            const auto* r1 = static_cast<const uint16_t*>(b.ptr_slot[w][8 * m + 2 * (lane % 4) + 1]);
            if (r0 != nullptr) lo = r0[lane / 4];
            if (r1 != nullptr) hi = r1[lane / 4];
        }
        r[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
    warp_barrier();
}

inline float shfl_xor(float v, int lane_mask) {
    Block& b = *current_block();
    const int w = b.current / 32, lane = b.current % 32;
    b.f_slot[w][lane] = v;
    warp_barrier();
    const float r = b.f_slot[w][lane ^ lane_mask];
    warp_barrier();
    return r;
}

inline float bits_to_float(uint16_t bits, bool bf16) {
    if (bf16) {
        const uint32_t u = static_cast<uint32_t>(bits) << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    }
    __half_raw raw;
    raw.x = bits;
    return __half2float(__half(raw));
}

// d += A(16x16) B(16x8) from the fragments of the 32 lanes (PTX ISA, mma.m16n8k16).
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
    Block& b = *current_block();
    const int w = b.current / 32, lane = b.current % 32;
    for (int i = 0; i < 4; ++i) b.a_slot[w][lane][i] = a[i];
    b.b_slot[w][lane][0] = b0;
    b.b_slot[w][lane][1] = b1;
    warp_barrier();
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        const uint32_t* al = b.a_slot[w][l];
        const int rows[4] = {g, g + 8, g, g + 8};
        const int cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
        for (int i = 0; i < 4; ++i) {
            A[rows[i]][cols[i]] = bits_to_float(al[i] & 0xFFFF, bf16);
            A[rows[i]][cols[i] + 1] = bits_to_float(al[i] >> 16, bf16);
        }
        const uint32_t* bl = b.b_slot[w][l];
        B[2 * t][g] = bits_to_float(bl[0] & 0xFFFF, bf16);
        B[2 * t + 1][g] = bits_to_float(bl[0] >> 16, bf16);
        B[2 * t + 8][g] = bits_to_float(bl[1] & 0xFFFF, bf16);
        B[2 * t + 9][g] = bits_to_float(bl[1] >> 16, bf16);
    }
    const int g = lane / 4, t = lane % 4;
    const int rows[4] = {g, g, g + 8, g + 8};
    const int cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int i = 0; i < 4; ++i) {
        double acc = 0.0;
        for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[rows[i]][k]) * B[k][cols[i]];
        d[i] = static_cast<float>(static_cast<double>(d[i]) + acc);
    }
    warp_barrier();
}

}  // namespace emu
