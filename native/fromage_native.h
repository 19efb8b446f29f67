/* fromage's native decoder: one forward pass of a Llama-family decoder over a bundle's weights.
 *
 * The weights are the bundle's own decoder.onnx initializers, loaded by the caller (engines/native.py
 * reads them into 64-byte-aligned buffers):
 * fp32 MatMul matrices (K, N) laid out in panels of 16 columns (fm_pack), or MatMulNBits' 4/8-bit
 * blocks with a scale and a minimum per block in fp16 (the GGUF Q4_1 grid, w = d*q + m), so a 4-bit
 * bundle computes with exactly the weights of the fp32 one; laid out in panels of 16 columns too
 * (fm_pack_nbits). The KV cache is the runtime's buffers of kv * capacity * d elements per layer, written
 * in place: floats, or IEEE fp16 halves with fm_model.kv_half; capacity is a multiple of FM_KV_BLOCK. A buffer
 * holds its blocks of FM_KV_BLOCK positions in order, each block its kv groups' tiles in order (tile (b, g) starts
 * at element t = (b * kv + g) * FM_KV_BLOCK * d), so a cache's first positions are its first elements whatever its
 * capacity: with s = p % FM_KV_BLOCK, the key of position p, group g, is at k[t + i * FM_KV_BLOCK + s] (a key tile
 * is dimension-major) and its value at v[t + s * d + i] (a value tile position-major), i < d, b = p / FM_KV_BLOCK.
 *
 * Threads: any thread may call. The calls that run OpenMP teams (fm_forward*, fm_quantize8 and the probes) run
 * them on one thread of the library's, "fromage-decode", started at the first such call: calls from several
 * threads take turns there, each returning when its work is done, so the process holds one team however many
 * threads call. A fork waits for the call in progress and ends the team first; the child starts a thread of its own. */
#ifndef FROMAGE_NATIVE_H
#define FROMAGE_NATIVE_H
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { FM_F32 = 0, FM_NBITS = 1 };
enum { FM_BLOCK = 32 };
enum { FM_PANEL = 16 };
enum { FM_KV_BLOCK = 64 };
enum { FM_MAX_TOP = 64 };  /* the most largest logits fm_forward_rows' out_top may ask for */

/* y = x @ W for x (T, K), y (T, N). */
typedef struct {
    int32_t kind, K, N, bits;
    const float *w;       /* FM_F32: ceil(N / 16) panels of K x 16 floats, panel p holding columns
                           * 16p..16p+15 (zero-padded): fm_pack of the ONNX MatMul initializer (K, N) */
    const uint8_t *q;     /* FM_NBITS (bits 4 or 8): fm_pack_nbits' panels of 16 columns, weight = d * q + m
                           * per block of 32 (q unsigned) */
} fm_linear;

/* The MLP's inner dimension in at most FM_MLP_PARTS parts (fm_model.mlp_parts): part s holds the inner indices
 * s * I / parts .. (s + 1) * I / parts - 1, gate_up[s] their gate | up columns (hidden, 2 I / parts) and down[s]
 * their rows of down (I / parts, hidden); the MLP adds the parts' down products to the residual, summed in part
 * order. So a decoding step's threads each compute a part alone, from its gate to its down. */
enum { FM_MLP_PARTS = 2 };

typedef struct {
    const float *attn_norm, *mlp_norm;
    fm_linear qkv, o;                 /* qkv: q | k | v columns */
    fm_linear gate_up[FM_MLP_PARTS], down[FM_MLP_PARTS];
} fm_layer;

typedef struct {
    int32_t n_layers, hidden, n_heads, n_kv, head_dim, inter, rope_positions, retrieval_dim;
    int32_t threads;                  /* for the parallel kernels (OpenMP); 0: OpenMP's default */
    float eps;
    const float *cos, *sin;           /* (rope_positions, head_dim/2) */
    const fm_layer *layers;
    const float *final_norm;
    fm_linear head, head_extra;       /* logits = [h @ head | h @ head_extra]; head_extra.N may be 0 */
    const float *wt, *wt_bias;        /* retrieval head (hidden, retrieval_dim) as fm_linear.w, (retrieval_dim) */
    /* Optional (head_q8.N = 0: none), for an fp32 head: its 8-bit copy (bits 8, fm_pack_nbits of fm_quantize8's
     * blocks) and fm_quantize8's bound (2, head.N), with which fm_forward_rows' out_top rows read 8-bit
     * weights and compute exactly only the few logits that can be among their k largest; and the n_exact
     * columns they get exactly whatever their value (a logit the caller rescales before choosing: [RET]'s). */
    fm_linear head_q8;
    const float *head_q8_bound;
    const int32_t *head_q8_exact;
    int32_t head_q8_n_exact;
    /* 1: the KV caches passed with this model hold fp16 halves (rounded to nearest even as they are appended;
     * attention computes in fp32 from them): half the cache's memory and reads, at fp16's precision. 0: floats. */
    int32_t kv_half;
    int32_t mlp_parts;                /* 1..FM_MLP_PARTS: the layers' gate_up[0..mlp_parts - 1] and down[...] */
    int32_t prompt_rows;              /* fm_forward's positions per pass at most (0: as 8 MB of attention partials allow) */
} fm_model;

/* The kernels are compiled once per instruction set and one copy is chosen when the library loads,
 * by what the CPU has: "avx512" (AVX-512 F/BW/VL/DQ with VNNI: 512-bit vectors, vpdpbusd's byte products
 * for the 4-bit weights), "avx2" (AVX2 + FMA + F16C), else "portable" (plain C; the only copy off x86-64). The
 * environment variable FROMAGE_KERNELS=avx512|avx2|portable forces one.
 * fm_cpu_ok: 1 when the chosen copy can run here, 0 when FROMAGE_KERNELS names a copy this CPU cannot
 * run (or none this build has); then the library runs the best one it can, and fm_kernels names it. */
int fm_cpu_ok(void);
/* The name of the kernels in use. */
const char *fm_kernels(void);
/* Switches to the named kernels ("auto" or NULL: the best this CPU runs) for the calls that follow
 * (not while another thread is inside fm_forward*). Returns 0, or -1 when this CPU or build cannot
 * run them (nothing changed). Results within one copy are deterministic; across copies they differ
 * by rounding. */
int fm_set_kernels(const char *name);
/* Feed T positions (embeds (T, hidden)) on a cache holding `past` positions of `capacity`;
 * k_cache[i], v_cache[i]: layer i's (n_kv, capacity, head_dim) buffers, appended in place.
 * Writes the last position's logits (head.N + head_extra.N) and L2-normalised retrieval embedding. The positions
 * run as fm_forward_rows' rows on the one cache, up to m->prompt_rows of them a pass: each position's results are
 * the same bits as when fed alone.
 * Returns 0, or -1 when past + T exceeds capacity or the rotary table or capacity is not a multiple of
 * FM_KV_BLOCK (or m->mlp_parts is not 1..FM_MLP_PARTS dividing inter), -2 when out of memory. */
int fm_forward(const fm_model *m, const float *embeds, int32_t T, int32_t past, int32_t capacity,
               void *const *k_cache, void *const *v_cache, float *logits, float *ret);
/* One decoding step of B independent sequences: sequence b feeds embeds[b] (embeds (B, hidden)) on its
 * own cache holding past[b] positions of capacity[b]; k_cache[b * n_layers + i], v_cache[...]: its
 * layer i's (n_kv, capacity[b], head_dim) buffers, appended in place. Rows may share a cache at
 * distinct positions (one prompt's consecutive positions: every row appends before any attends).
 * Outputs for the n_out rows out_rows[] (ascending), in that order: logits (n_out, head.N +
 * head_extra.N) and ret (n_out, retrieval_dim); out_rows NULL: all B rows (n_out is then ignored).
 * Each weight matrix is read once for all B rows, and row b is bit-identical to fm_forward(T = 1) of
 * sequence b alone (its logits, ret and cache writes).
 * Returns 0, or -1 when some past[b] + 1 exceeds capacity[b] or the rotary table, some capacity[b] is
 * not a multiple of FM_KV_BLOCK, out_rows is not ascending within [0, B) or m->mlp_parts is out of range (nothing
 * written), -2 when out of memory. */
int fm_forward_batch(const fm_model *m, const float *embeds, int32_t B, const int32_t *past, const int32_t *capacity,
                     void *const *k_cache, void *const *v_cache, int32_t n_out, const int32_t *out_rows,
                     float *logits, float *ret);

/* fm_forward_batch, where out_top (n_out counts, or NULL: all 0) says how many of its largest logits an
 * output row wants: 0 all of them; 1 its greedy choice; k (<= FM_MAX_TOP) top-k sampling's. With the model's
 * head_q8, a row with k >= 1 gets exact logits (the same bits as with 0) for its k largest, every logit tied
 * with them and the head_q8_exact columns, and -INFINITY for the others whose value cannot be among the
 * k largest (a few panels of 16 columns computed exactly: ~1/4 of the head's memory reads). Without
 * head_q8, or for k > FM_MAX_TOP, all are exact. head_extra's logits are always exact.
 * out_best (n_out, or NULL): for each greedy row (k = 1), the column of its largest logit, the first of equal
 * ones, among all but the head_q8_exact columns (which the caller may rescale before it chooses), -1 where none
 * is a number above -INFINITY; -1 for the other rows. A decoding loop then reads two logits, not the row. */
int fm_forward_rows(const fm_model *m, const float *embeds, int32_t B, const int32_t *past, const int32_t *capacity,
                    void *const *k_cache, void *const *v_cache, int32_t n_out, const int32_t *out_rows,
                    const int32_t *out_top, float *logits, float *ret, int32_t *out_best);

/* dst (ceil(N / FM_PANEL) * FM_PANEL * K floats) = src (K, N) row-major, an ONNX MatMul initializer,
 * laid out as fm_linear.w. */
void fm_pack(const float *src, int64_t K, int64_t N, float *dst);

/* dst (ceil(N / FM_PANEL) * K/32 * (64 + 16 * 32 * bits / 8) bytes, 64-byte aligned) = a 4/8-bit matrix
 * laid out as fm_linear.q: q (N, K/32, 32 * bits / 8) MatMulNBits' packing (4-bit: element 2i of a block
 * in the low nibble of byte i), dm (N, 2 K/32) each column's [d | m] in fp16. Returns 0, or -1 (nothing
 * written) unless bits is 4 or 8, K a positive multiple of 32 and N positive. */
int fm_pack_nbits(const uint8_t *q, const uint16_t *dm, int64_t K, int64_t N, int32_t bits, uint8_t *dst);

/* An fp32 matrix w (K, N), row-major, rounded to 8-bit blocks of 32 (w' = d q + m, d and m fp16, m <= the
 * block's least weight): q (N, K/32, 32) and dm (N, 2 K/32) as fm_pack_nbits takes them, and bound (2, N):
 * per column the largest |w - w'|, then the largest 255 d + |m| of its blocks (fm_model.head_q8_bound).
 * Returns 0, or -1 (nothing written) unless K is a positive multiple of 32 and N positive. */
int fm_quantize8(const float *w, int64_t K, int64_t N, uint8_t *q, uint16_t *dm, float *bound);

/* Where a step's time goes. With fm_profile(1), fm_forward and fm_forward_rows called from this thread add the
 * wall time of each kind of operation they run to this thread's counters; fm_profile_read writes them
 * (FM_OPS seconds, indexed by fm_op) and returns the calls counted, then sets them to zero. Off by default;
 * on, it costs a clock read per operation (~240 per step of a 30-layer model). */
enum fm_op { FM_OP_NORM, FM_OP_QKV, FM_OP_ROPE, FM_OP_ATTENTION, FM_OP_O, FM_OP_GATE_UP, FM_OP_SILU, FM_OP_DOWN,
             FM_OP_HEAD, FM_OPS };
void fm_profile(int on);
int64_t fm_profile_read(double *seconds);

/* Sums a (n floats) with OpenMP's threads, each reading its share as `streams` side-by-side forward
 * streams (1, 2, 4 or 8): the reads that `fromage bench` measures the memory bandwidth roofline with.
 * piece 0: one contiguous share per thread; else pieces of `piece` floats dealt to the threads in
 * turn. Tails (a partial piece, fewer than 32 * streams floats of a share) are left out. */
float fm_stream_read(const float *a, size_t n, int streams, size_t piece);

/* `iterations` rounds of independent fused multiply-adds on registers in each of OpenMP's threads, with the
 * kernels' vectors (the cores' arithmetic rate at the time, which `fromage bench` reports beside the
 * bandwidth); returns the floating-point operations done (time the call for the rate). */
double fm_fma_loop(int64_t iterations);

/* The mean time, in nanoseconds, for OpenMP's threads 0 and 1 to pass a cache line there and back, over
 * `rounds` round trips (0 where OpenMP gives the calling thread one): ~60 ns between cores that share an L3,
 * several times that between cores of different L3s or sockets, where every wait of a step's threads for each
 * other costs as much. A virtual machine's cores may move from one to the other within seconds; `fromage bench`
 * reports it beside the bandwidth. */
double fm_core_round_trip(int rounds);

/* How a decoding step of one sequence stores the attention partials that another of its threads merges: -1 (the
 * default) by where the cores are, measured (fm_core_round_trip, a few dozen round trips) at most every 100 ms
 * when a step starts: past the caches (streaming stores) when a round trip takes over 150 ns, as between cores
 * of different L3s, where a line the other core has read costs its writer a round trip before it may write it
 * again; in the caches otherwise, where the other core reads them fastest. 0: always in the caches; 1: always
 * streamed (the AVX-512 kernels only; the others always store them in the caches). The same bits either way. */
void fm_set_streamed_partials(int mode);

#ifdef __cplusplus
}
#endif
#endif
