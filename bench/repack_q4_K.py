#!/usr/bin/env python3
"""Q4_K -> Q4_Kx8 repack: stock llama.cpp's function against patches/0003's, same run.

The pool converts every expert it loads into the CPU backend's interleaved layout
(CPU_REPACK), so the speed of `repack_q4_K_to_q4_K_8_bl` is part of every miss.
This script takes that function (and the helpers it calls) out of the stock and the
patched source trees that `expertd engine build` prepared, compiles both into one
program with small stand-ins for the ggml types, checks that they write the same
bytes for random blocks (several shapes, both interleave widths), and times them on
one expert projection of the bench model (2048 x 768 Q4_K, 864 KiB) in alternating
rounds. Exits non-zero if the bytes differ.

Usage: bench/repack_q4_K.py [--stock-src DIR] [--patched-src DIR] [--rounds N]
(defaults: target/engine-work/{stock,patched}/src; needs g++.)
"""
import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = "ggml/src/ggml-cpu/repack.cpp"

# Stand-ins for the ggml declarations the extracted code uses (same layouts).
PRELUDE = r"""
#include <algorithm>
#include <cassert>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>
typedef uint16_t ggml_half;
#define QK_K 256
#define K_SCALE_SIZE 12
#define GGML_RESTRICT __restrict__
#define GGML_ASSERT(x) assert(x)
#define GGML_UNUSED(x) (void)(x)
#define GGML_COMMON_AGGR_U u
#define GGML_COMMON_AGGR_S s
enum ggml_type { GGML_TYPE_Q4_K = 12 };
struct ggml_tensor { ggml_type type; int64_t ne[4]; void * data; };
static int64_t ggml_nrows(const ggml_tensor * t) { return t->ne[1] * t->ne[2] * t->ne[3]; }
struct block_q4_K {
    union { struct { ggml_half d; ggml_half dmin; } s; uint32_t dm; } u;
    uint8_t scales[K_SCALE_SIZE];
    uint8_t qs[QK_K / 2];
};
struct block_q4_Kx8 { ggml_half d[8]; ggml_half dmin[8]; uint8_t scales[96]; uint8_t qs[1024]; };
static_assert(sizeof(block_q4_K) == 144, "block_q4_K");
static_assert(sizeof(block_q4_Kx8) == 1152, "block_q4_Kx8");
"""

MAIN = r"""
typedef int (*repack_fn)(ggml_tensor *, int, const void *, size_t);

static void fill(std::vector<block_q4_K> & v, std::mt19937 & g) {
    for (auto & b : v) {
        uint8_t * p = (uint8_t *) &b;
        for (size_t i = 0; i < sizeof b; i++) p[i] = (uint8_t) g();
    }
}

static double gbps(repack_fn f, ggml_tensor * t, const std::vector<block_q4_K> & src, int iters) {
    const size_t bytes = src.size() * sizeof src[0];
    auto t0 = std::chrono::steady_clock::now();
    for (int k = 0; k < iters; k++) f(t, 8, src.data(), bytes);
    return iters * bytes / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 1e9;
}

int main(int argc, char ** argv) {
    const int rounds = argc > 1 ? atoi(argv[1]) : 5;
    std::mt19937 g(7);
    int checked = 0;
    for (int ne0 : {256, 512, 2048}) {
        for (int ne1 : {8, 64, 768}) {
            const int nb = ne0 / QK_K;
            std::vector<block_q4_K> src(ne1 * nb);
            fill(src, g);
            std::vector<block_q4_Kx8> a(ne1 / 8 * nb), b(ne1 / 8 * nb);
            for (int il : {8, 4}) {
                memset(a.data(), 0x11, a.size() * sizeof a[0]);
                memset(b.data(), 0x22, b.size() * sizeof b[0]);
                ggml_tensor ta{GGML_TYPE_Q4_K, {ne0, ne1, 1, 1}, a.data()};
                ggml_tensor tb{GGML_TYPE_Q4_K, {ne0, ne1, 1, 1}, b.data()};
                stock::repack_q4_K_to_q4_K_8_bl(&ta, il, src.data(), src.size() * sizeof src[0]);
                patched::repack_q4_K_to_q4_K_8_bl(&tb, il, src.data(), src.size() * sizeof src[0]);
                if (memcmp(a.data(), b.data(), a.size() * sizeof a[0]) != 0) {
                    printf("MISMATCH: %d x %d, interleave %d\n", ne0, ne1, il);
                    return 1;
                }
                checked++;
            }
        }
    }
    printf("same bytes: %d cases (3 widths x 3 row counts x 2 interleaves, random blocks)\n", checked);

    const int ne0 = 2048, ne1 = 768, nb = ne0 / QK_K; // one bench-model expert projection
    std::vector<block_q4_K> src(ne1 * nb);
    fill(src, g);
    std::vector<block_q4_Kx8> dst(ne1 / 8 * nb);
    ggml_tensor t{GGML_TYPE_Q4_K, {ne0, ne1, 1, 1}, dst.data()};
    std::vector<double> s, p;
    for (int r = 0; r < rounds; r++) {
        s.push_back(gbps(stock::repack_q4_K_to_q4_K_8_bl, &t, src, 300));
        p.push_back(gbps(patched::repack_q4_K_to_q4_K_8_bl, &t, src, 300));
        printf("round %d: stock %.2f GB/s, patched %.2f GB/s\n", r + 1, s.back(), p.back());
    }
    std::sort(s.begin(), s.end());
    std::sort(p.begin(), p.end());
    const double sm = s[s.size() / 2], pm = p[p.size() / 2];
    printf("median of %d rounds, %zu KiB per call: stock %.2f GB/s, patched %.2f GB/s, ratio %.2fx\n",
           rounds, src.size() * sizeof src[0] / 1024, sm, pm, pm / sm);
    return 0;
}
"""


def top_level_span(text, start_marker):
    """From the first definition after the function that starts at `start_marker`."""
    i = text.index(start_marker)
    return text.index("\n}\n", i) + 3


def extract(tree):
    """The Q4_Kx8 helpers and repack function of one tree's repack.cpp."""
    path = os.path.join(tree, REL)
    try:
        text = open(path).read()
    except OSError as e:
        sys.exit(f"{path}: {e} (run `expertd engine build` and `expertd engine build --stock` first)")
    # the helpers sit between make_block_q4_0x16 and make_block_q4_Kx16 (at the pin)
    lo = top_level_span(text, "static block_q4_0x16 make_block_q4_0x16(")
    hi = text.index("static block_q4_Kx16 make_block_q4_Kx16(")
    helpers = text[lo:hi]
    if "make_block_q4_Kx8" not in helpers:
        sys.exit(f"{path}: make_block_q4_Kx8 not where expected")
    f = text.index("static int repack_q4_K_to_q4_K_8_bl(")
    fn = text[f:text.index("\n}\n", f) + 3]
    return helpers + fn


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stock-src", default=os.path.join(ROOT, "target/engine-work/stock/src"))
    ap.add_argument("--patched-src", default=os.path.join(ROOT, "target/engine-work/patched/src"))
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    code = (PRELUDE
            + "namespace stock {\n" + extract(a.stock_src) + "}\n"
            + "namespace patched {\n" + extract(a.patched_src) + "}\n" + MAIN)
    with tempfile.TemporaryDirectory() as d:
        src, exe = os.path.join(d, "repack.cpp"), os.path.join(d, "repack")
        open(src, "w").write(code)
        subprocess.run(["g++", "-O3", "-march=native", "-std=c++17", "-o", exe, src], check=True)
        sys.exit(subprocess.run([exe, str(a.rounds)]).returncode)


if __name__ == "__main__":
    main()
