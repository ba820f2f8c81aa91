/* The pixels a training crop's resize reads, for a meta-batch of crops (fsl/data/native.py calls it through ctypes,
   which releases Python's interpreter lock for the call).

   out[b, r, c, k] = pixels[offsets[b] + (rows[b, r] * widths[b] + cols[b, c]) * 3 + k], k = 0, 1, 2:
   pixels   the train store's flat uint8 array, image after image, each height x width x 3
   offsets  (n,) byte offset of crop b's image; widths (n,) its width
   rows     (n, R) and cols (n, C) the source rows and columns (fsl.data.transforms.resize_taps)
   out      (n, R, C, 3) uint8, contiguous
   cols is [x0 | x1], each ascending (cv2's taps): a row's span is x0's first to last column
   The same bytes as ImageStore.patches' numpy loop (two np.take per crop), tests/test_episodes.py. */
#include <stdint.h>
#include <string.h>

#define FSL_MAX_TAPS 4096

/* the limit, for native.py to read (ctypes in_dll): a wider crop is gathered by numpy instead */
const int64_t fsl_max_taps = FSL_MAX_TAPS;

void fsl_patches(const uint8_t *pixels, const int64_t *offsets, const int64_t *widths, const int64_t *rows,
                 const int64_t *cols, int64_t n, int64_t R, int64_t C, uint8_t *out) {
    int64_t col3[FSL_MAX_TAPS];  /* a crop's column offsets in bytes; C <= FSL_MAX_TAPS (native.py checks fsl_max_taps) */
    for (int64_t b = 0; b < n; b++) {
        const uint8_t *image = pixels + offsets[b];
        const int64_t *row = rows + b * R, *col = cols + b * C, stride = widths[b] * 3;
        uint8_t *dst = out + b * R * C * 3;
        for (int64_t c = 0; c < C; c++)
            col3[c] = col[c] * 3;
        for (int64_t r = 0; r < R; r++) {
            const uint8_t *src = image + row[r] * stride;
            if (r + 2 < R) {  /* the row after next, its whole span: each row is a new stream the hardware
                                prefetcher would find only after its first misses (-23 % of the time) */
                const uint8_t *next = image + row[r + 2] * stride + col3[0];
                for (int64_t k = 0; k <= col3[C / 2 - 1] - col3[0]; k += 64)
                    __builtin_prefetch(next + k);
            }
            /* a pixel as one 4-byte move (its 4th byte is overwritten by the next pixel), but the row's last: its
               4th byte could lie past the store's end, and past the row of out */
            for (int64_t c = 0; c < C - 1; c++) {
                memcpy(dst, src + col3[c], 4);
                dst += 3;
            }
            if (C > 0) {
                memcpy(dst, src + col3[C - 1], 3);
                dst += 3;
            }
        }
    }
}
