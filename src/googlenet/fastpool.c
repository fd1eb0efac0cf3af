/* 3x3 max-pool (any stride, padding 0 or 1) on bf16 channels-last tensors: the inception pool
 * branches' 3x3/1 and the stage pools' 3x3/2.
 *
 * Why: PyTorch's CPU kernel writes an int64 index per output and its backward is a scalar
 * scatter loop; in a cifar training step the pools took ~17% of the time. Here the forward
 * stores the winning window position as one byte (0..8, row-major in the 3x3 window), and the
 * backward gathers instead of scattering, so each input element is written once. Both keep the
 * window's nine taps in registers: one pass over the channels per output (forward) or per input
 * (backward), which the compiler vectorises, instead of one pass per tap.
 *
 * Same function as F.max_pool2d, bit for bit, forward and backward: the first maximum in scan
 * order wins (strict >) and a NaN wins, and an input's gradient adds its winners' gradients in
 * bf16, in output order, as ATen's channels-last kernel does.
 * Tensors are N x H x W x C (input) and N x OH x OW x C (output) contiguous. The caller gives OH,
 * OW (ATen's formula, ceil_mode included).
 *
 * Rows are shared out by OpenMP. Built with -fopenmp, this library takes the libgomp.so.1 that
 * torch has already loaded, so it runs on torch's own worker threads: separate threads would
 * fight torch's workers, which spin for a while after each op (measured: 2x slower pools).
 */
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* The nine taps, unrolled; taps past the valid ones repeat the last valid tap, which changes
   nothing: an equal value never wins (strict >) and a repeated NaN wins with its own position. */
#define FWD_TAP(i)                                                                                 \
    {                                                                                              \
        float v = bf16_to_f32(p##i[c]);                                                            \
        int take = (v > b) | (v != v);                                                             \
        b = take ? v : b;                                                                          \
        k = take ? q##i : k;                                                                       \
    }

/* One output's channels. A function of its own with restrict pointers, so that the channel
   loop vectorises (inside an OpenMP region the compiler cannot see that the pointers differ). */
static __attribute__((noinline)) void fwd_channels(
    int64_t C, const uint16_t *restrict p0, const uint16_t *restrict p1,
    const uint16_t *restrict p2, const uint16_t *restrict p3, const uint16_t *restrict p4,
    const uint16_t *restrict p5, const uint16_t *restrict p6, const uint16_t *restrict p7,
    const uint16_t *restrict p8, uint8_t q0, uint8_t q1, uint8_t q2, uint8_t q3, uint8_t q4,
    uint8_t q5, uint8_t q6, uint8_t q7, uint8_t q8, uint16_t *restrict yo, uint8_t *restrict ko) {
    if (ko) {
        for (int64_t c = 0; c < C; c++) {
            float b = bf16_to_f32(p0[c]);
            uint8_t k = q0;
            FWD_TAP(1) FWD_TAP(2) FWD_TAP(3) FWD_TAP(4)
            FWD_TAP(5) FWD_TAP(6) FWD_TAP(7) FWD_TAP(8)
            uint32_t u; /* b holds a bf16 value widened exactly: narrowing is exact */
            memcpy(&u, &b, 4);
            yo[c] = (uint16_t)(u >> 16);
            ko[c] = k;
        }
    } else {
        for (int64_t c = 0; c < C; c++) {
            float b = bf16_to_f32(p0[c]);
            uint8_t k = q0;
            FWD_TAP(1) FWD_TAP(2) FWD_TAP(3) FWD_TAP(4)
            FWD_TAP(5) FWD_TAP(6) FWD_TAP(7) FWD_TAP(8)
            (void)k;
            uint32_t u;
            memcpy(&u, &b, 4);
            yo[c] = (uint16_t)(u >> 16);
        }
    }
}

void maxpool3_forward_bf16(const uint16_t *restrict x, uint16_t *restrict y,
                           uint8_t *restrict code, int64_t N, int64_t H, int64_t W, int64_t C,
                           int64_t OH, int64_t OW, int64_t S, int64_t P) {
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t oh = 0; oh < OH; oh++) {
            const uint16_t *xn = x + n * H * W * C;
            for (int64_t ow = 0; ow < OW; ow++) {
                const uint16_t *p[9];
                uint8_t q[9];
                int m = 0;
                for (int kh = 0; kh < 3; kh++) {
                    int64_t ih = oh * S - P + kh;
                    if (ih < 0 || ih >= H) continue;
                    for (int kw = 0; kw < 3; kw++) {
                        int64_t iw = ow * S - P + kw;
                        if (iw < 0 || iw >= W) continue;
                        p[m] = xn + (ih * W + iw) * C;
                        q[m++] = (uint8_t)(kh * 3 + kw);
                    }
                }
                for (int i = m; i < 9; i++) { /* m >= 1: every window holds an input */
                    p[i] = p[m - 1];
                    q[i] = q[m - 1];
                }
                int64_t o = ((n * OH + oh) * OW + ow) * C;
                fwd_channels(C, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], q[0], q[1],
                             q[2], q[3], q[4], q[5], q[6], q[7], q[8], y + o,
                             code ? code + o : NULL);
            }
        }
    }
}

/* An output that chose this input adds its gradient, rounded to bf16 as ATen's bf16 +=. Taps
   past the valid ones carry position 255, which no code holds. */
#define BWD_TAP(i)                                                                                 \
    {                                                                                              \
        float s = bf16_to_f32(f32_to_bf16(a + bf16_to_f32(g##i[c])));                              \
        a = (k##i[c] == q##i) ? s : a;                                                             \
    }

static __attribute__((noinline)) void bwd_channels(
    int m, int64_t C, const uint16_t *restrict g0, const uint16_t *restrict g1,
    const uint16_t *restrict g2, const uint16_t *restrict g3, const uint16_t *restrict g4,
    const uint16_t *restrict g5, const uint16_t *restrict g6, const uint16_t *restrict g7,
    const uint16_t *restrict g8, const uint8_t *restrict k0, const uint8_t *restrict k1,
    const uint8_t *restrict k2, const uint8_t *restrict k3, const uint8_t *restrict k4,
    const uint8_t *restrict k5, const uint8_t *restrict k6, const uint8_t *restrict k7,
    const uint8_t *restrict k8, uint8_t q0, uint8_t q1, uint8_t q2, uint8_t q3, uint8_t q4,
    uint8_t q5, uint8_t q6, uint8_t q7, uint8_t q8, uint16_t *restrict out) {
    switch (m) { /* stride 2: 1, 2 or 4 outputs hold an input, so skip the padding taps */
#define BWD_LOOP(TAPS)                                                                             \
    for (int64_t c = 0; c < C; c++) {                                                              \
        float a = 0.0f;                                                                            \
        TAPS out[c] = f32_to_bf16(a);                                                              \
    }                                                                                              \
    break;
    case 1: BWD_LOOP(BWD_TAP(0))
    case 2: BWD_LOOP(BWD_TAP(0) BWD_TAP(1))
    case 3: BWD_LOOP(BWD_TAP(0) BWD_TAP(1) BWD_TAP(2))
    case 4: BWD_LOOP(BWD_TAP(0) BWD_TAP(1) BWD_TAP(2) BWD_TAP(3))
    case 6: BWD_LOOP(BWD_TAP(0) BWD_TAP(1) BWD_TAP(2) BWD_TAP(3) BWD_TAP(4) BWD_TAP(5))
    default:
        BWD_LOOP(BWD_TAP(0) BWD_TAP(1) BWD_TAP(2) BWD_TAP(3) BWD_TAP(4) BWD_TAP(5) BWD_TAP(6)
                 BWD_TAP(7) BWD_TAP(8))
#undef BWD_LOOP
    }
}

void maxpool3_backward_bf16(const uint16_t *restrict gy, const uint8_t *restrict code,
                            uint16_t *restrict gx, int64_t N, int64_t H, int64_t W, int64_t C,
                            int64_t OH, int64_t OW, int64_t S, int64_t P) {
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t h = 0; h < H; h++) {
            for (int64_t w = 0; w < W; w++) {
                uint16_t *out = gx + ((n * H + h) * W + w) * C;
                /* the outputs whose window holds (h, w), in row-major output order */
                const uint16_t *g[9];
                const uint8_t *kk[9];
                uint8_t q[9];
                int m = 0;
                int64_t th = h + P - 2, tw = w + P - 2; /* kh = h + P - oh * S in [0, 2] */
                int64_t oh1 = (h + P) / S < OH ? (h + P) / S : OH - 1;
                int64_t ow1 = (w + P) / S < OW ? (w + P) / S : OW - 1;
                for (int64_t oh = th <= 0 ? 0 : (th + S - 1) / S; oh <= oh1; oh++) {
                    int64_t kh = h + P - oh * S;
                    for (int64_t ow = tw <= 0 ? 0 : (tw + S - 1) / S; ow <= ow1; ow++) {
                        int64_t kw = w + P - ow * S;
                        int64_t o = ((n * OH + oh) * OW + ow) * C;
                        g[m] = gy + o;
                        kk[m] = code + o;
                        q[m++] = (uint8_t)(kh * 3 + kw);
                    }
                }
                if (m == 0) { /* in no window (stride > 1 without padding) */
                    memset(out, 0, sizeof(uint16_t) * C);
                    continue;
                }
                for (int i = m; i < 9; i++) {
                    g[i] = g[0];
                    kk[i] = kk[0];
                    q[i] = 255;
                }
                bwd_channels(m, C, g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], kk[0], kk[1],
                             kk[2], kk[3], kk[4], kk[5], kk[6], kk[7], kk[8], q[0], q[1], q[2],
                             q[3], q[4], q[5], q[6], q[7], q[8], out);
            }
        }
    }
}
