/* 3x3, stride 1, padding 1 max-pool (the inception pool branch) on bf16 channels-last tensors.
 *
 * Why: PyTorch's CPU kernel for this case writes an int64 index per output and its backward is
 * a scalar scatter loop; together ~23% of a cifar training step. Here the forward stores the
 * winning window position as one byte (0..8), and the backward gathers instead of scattering,
 * so each input element is written once and the loop over channels vectorises.
 *
 * Same function as F.max_pool2d, bit for bit, forward and backward: the first maximum in scan
 * order wins (strict >) and a NaN wins, and an input's gradient adds its winners' gradients in
 * bf16, in output order, as ATen's channels-last kernel does.
 * Tensors are N x H x W x C contiguous; each call handles batch items [n0, n1).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
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

int maxpool3_forward_bf16(const uint16_t *x, uint16_t *y, uint8_t *code, int64_t n0, int64_t n1,
                          int64_t H, int64_t W, int64_t C) {
    float *best = malloc(sizeof(float) * C);
    if (!best) return 1;
    for (int64_t n = n0; n < n1; n++) {
        const uint16_t *xn = x + n * H * W * C;
        for (int64_t h = 0; h < H; h++) {
            for (int64_t w = 0; w < W; w++) {
                int64_t o = ((n * H + h) * W + w) * C;
                uint8_t *k = code ? code + o : NULL;
                int first = 1;
                for (int dh = -1; dh <= 1; dh++) {
                    int64_t ih = h + dh;
                    if (ih < 0 || ih >= H) continue;
                    for (int dw = -1; dw <= 1; dw++) {
                        int64_t iw = w + dw;
                        if (iw < 0 || iw >= W) continue;
                        const uint16_t *xi = xn + (ih * W + iw) * C;
                        uint8_t pos = (uint8_t)((dh + 1) * 3 + (dw + 1));
                        if (first) {
                            for (int64_t c = 0; c < C; c++) best[c] = bf16_to_f32(xi[c]);
                            if (k)
                                for (int64_t c = 0; c < C; c++) k[c] = pos;
                            first = 0;
                            continue;
                        }
                        if (k) {
                            for (int64_t c = 0; c < C; c++) {
                                float v = bf16_to_f32(xi[c]);
                                int take = (v > best[c]) | (v != v);
                                best[c] = take ? v : best[c];
                                k[c] = take ? pos : k[c];
                            }
                        } else {
                            for (int64_t c = 0; c < C; c++) {
                                float v = bf16_to_f32(xi[c]);
                                best[c] = ((v > best[c]) | (v != v)) ? v : best[c];
                            }
                        }
                    }
                }
                /* best holds bf16 values widened exactly: narrowing back is exact */
                for (int64_t c = 0; c < C; c++) {
                    uint32_t u;
                    memcpy(&u, &best[c], 4);
                    y[o + c] = (uint16_t)(u >> 16);
                }
            }
        }
    }
    free(best);
    return 0;
}

int maxpool3_backward_bf16(const uint16_t *gy, const uint8_t *code, uint16_t *gx, int64_t n0,
                           int64_t n1, int64_t H, int64_t W, int64_t C) {
    float *acc = malloc(sizeof(float) * C);
    if (!acc) return 1;
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t h = 0; h < H; h++) {
            for (int64_t w = 0; w < W; w++) {
                for (int64_t c = 0; c < C; c++) acc[c] = 0.0f;
                /* outputs whose window holds (h, w): (h - dh, w - dw); they chose it when
                   their code is the window position of offset (dh, dw) */
                for (int dh = 1; dh >= -1; dh--) { /* outputs in row-major order */
                    int64_t oh = h - dh;
                    if (oh < 0 || oh >= H) continue;
                    for (int dw = 1; dw >= -1; dw--) {
                        int64_t ow = w - dw;
                        if (ow < 0 || ow >= W) continue;
                        int64_t o = ((n * H + oh) * W + ow) * C;
                        uint8_t pos = (uint8_t)((dh + 1) * 3 + (dw + 1));
                        const uint8_t *k = code + o;
                        const uint16_t *g = gy + o;
                        for (int64_t c = 0; c < C; c++) { /* ATen's bf16 += */
                            float sum = bf16_to_f32(f32_to_bf16(acc[c] + bf16_to_f32(g[c])));
                            acc[c] = (k[c] == pos) ? sum : acc[c];
                        }
                    }
                }
                uint16_t *out = gx + ((n * H + h) * W + w) * C;
                for (int64_t c = 0; c < C; c++) out[c] = f32_to_bf16(acc[c]);
            }
        }
    }
    free(acc);
    return 0;
}
