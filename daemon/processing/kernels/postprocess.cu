// Post-processing on the GPU so that only final results cross to the host.
//
// Classification: softmax + top-k, one block per image. Detection: decode with score filter
// into a compact candidate list (atomic append, one thread per anchor), a rank sort that makes
// the list's order independent of the atomics, then greedy NMS, one block per image, which also
// maps the kept boxes back to original-image pixels.
//
// The CPU reference (daemon.processing.cpu over calib.detection) is matched operation for
// operation: the same float32 expressions with separately rounded IEEE operations (no fused
// multiply-add), first maximum for the best class, strict "score > threshold", suppression
// unless "iou <= threshold", ties in score broken by anchor index, and the box mapping in double
// as NumPy does it. Only YOLOX's exp() may differ from NumPy's by an ulp.

#include <math.h>

#define BLOCK 256

struct Candidate {
    float x1, y1, x2, y2, score;
    int cls, anchor, unused;
};

// ----------------------------------------------------------------------------- classification

__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
    return bi < 0 || (i >= 0 && (v > bv || (v == bv && i < bi)));
}

extern "C" __global__ void softmax_topk(const float* logits, int C, int k, int use_softmax, float* out_scores,
                                        int* out_classes) {
    __shared__ float sv[BLOCK];
    __shared__ int si[BLOCK];
    const int n = blockIdx.x, t = threadIdx.x;
    const float* x = logits + (size_t)n * C;

    float m = -INFINITY;
    for (int i = t; i < C; i += BLOCK) m = fmaxf(m, x[i]);
    sv[t] = m;
    __syncthreads();
    for (int w = BLOCK / 2; w > 0; w >>= 1) {
        if (t < w) sv[t] = fmaxf(sv[t], sv[t + w]);
        __syncthreads();
    }
    m = sv[0];
    __syncthreads();
    float sum = 0.f;
    if (use_softmax) {
        for (int i = t; i < C; i += BLOCK) sum += expf(x[i] - m);
        sv[t] = sum;
        __syncthreads();
        for (int w = BLOCK / 2; w > 0; w >>= 1) {
            if (t < w) sv[t] += sv[t + w];
            __syncthreads();
        }
        sum = sv[0];
        __syncthreads();
    }

    // Selection r picks the best element strictly after selection r - 1 in the order
    // (value descending, index ascending): no per-class flags, so any class count works.
    float pv = INFINITY;
    int pi = -1;
    for (int r = 0; r < k; ++r) {
        float bv = -INFINITY;
        int bi = -1;
        for (int i = t; i < C; i += BLOCK) {
            const float v = x[i];
            const bool after = v < pv || (v == pv && i > pi);
            if (after && better(v, i, bv, bi)) { bv = v; bi = i; }
        }
        sv[t] = bv;
        si[t] = bi;
        __syncthreads();
        for (int w = BLOCK / 2; w > 0; w >>= 1) {
            if (t < w && better(sv[t + w], si[t + w], sv[t], si[t])) { sv[t] = sv[t + w]; si[t] = si[t + w]; }
            __syncthreads();
        }
        pv = sv[0];
        pi = si[0];
        if (t == 0) {
            out_classes[(size_t)n * k + r] = pi;
            out_scores[(size_t)n * k + r] = pi < 0 ? 0.f : (use_softmax ? __fdiv_rn(expf(pv - m), sum) : pv);
        }
        __syncthreads();
    }
}

// ----------------------------------------------------------------------------- detection

// variant: 0 YOLOX (grid-relative boxes, needs grid), 1 YOLOv5 ([A, 5 + C]), 2 YOLOv8 ([4 + C, A]).
extern "C" __global__ void yolo_decode(const float* pred, int A, int C, int variant, const float* grid,
                                       float threshold, Candidate* cand, int* count) {
    const int a = blockIdx.x * blockDim.x + threadIdx.x, n = blockIdx.y;
    if (a >= A) return;
    float cx, cy, w, h, best = 0.f;
    int cls = -1;
    if (variant == 2) {
        const float* p = pred + (size_t)n * (4 + C) * A;
        cx = p[a];
        cy = p[(size_t)A + a];
        w = p[(size_t)2 * A + a];
        h = p[(size_t)3 * A + a];
        for (int c = 0; c < C; ++c) {
            const float s = p[(size_t)(4 + c) * A + a];
            if (cls < 0 || s > best) { best = s; cls = c; }
        }
    } else {
        const float* p = pred + ((size_t)n * A + a) * (5 + C);
        const float obj = p[4];
        for (int c = 0; c < C; ++c) {
            const float s = __fmul_rn(obj, p[5 + c]);
            if (cls < 0 || s > best) { best = s; cls = c; }
        }
        if (variant == 0) {
            const float gx = grid[3 * a], gy = grid[3 * a + 1], stride = grid[3 * a + 2];
            cx = __fmul_rn(__fadd_rn(p[0], gx), stride);
            cy = __fmul_rn(__fadd_rn(p[1], gy), stride);
            w = __fmul_rn(expf(fminf(p[2], 30.f)), stride);
            h = __fmul_rn(expf(fminf(p[3], 30.f)), stride);
        } else {
            cx = p[0];
            cy = p[1];
            w = p[2];
            h = p[3];
        }
    }
    if (cls < 0 || !(best > threshold)) return;
    const float hw = __fmul_rn(w, 0.5f), hh = __fmul_rn(h, 0.5f);
    const int slot = atomicAdd(count + n, 1);
    Candidate c;
    c.x1 = __fsub_rn(cx, hw);
    c.y1 = __fsub_rn(cy, hh);
    c.x2 = __fadd_rn(cx, hw);
    c.y2 = __fadd_rn(cy, hh);
    c.score = best;
    c.cls = cls;
    c.anchor = a;
    c.unused = 0;
    cand[(size_t)n * A + slot] = c;
}

// Each candidate's position in (score descending, anchor ascending) order: the number of
// candidates before it. Keys are unique (one candidate per anchor), so positions are too.
extern "C" __global__ void yolo_rank(const Candidate* cand, const int* count, int A, Candidate* sorted) {
    __shared__ float ts[BLOCK];
    __shared__ int ta[BLOCK];
    const int n = blockIdx.y, m = min(count[n], A);
    if (blockIdx.x * BLOCK >= m) return;
    const int i = blockIdx.x * BLOCK + threadIdx.x;
    const Candidate* c = cand + (size_t)n * A;
    const bool active = i < m;
    float s = 0.f;
    int a = 0;
    if (active) { s = c[i].score; a = c[i].anchor; }
    int rank = 0;
    for (int base = 0; base < m; base += BLOCK) {
        const int j = base + threadIdx.x;
        if (j < m) { ts[threadIdx.x] = c[j].score; ta[threadIdx.x] = c[j].anchor; }
        __syncthreads();
        if (active) {
            const int lim = min(BLOCK, m - base);
            for (int q = 0; q < lim; ++q) rank += (ts[q] > s) || (ts[q] == s && ta[q] < a);
        }
        __syncthreads();
    }
    if (active) sorted[(size_t)n * A + rank] = c[i];
}

__device__ __forceinline__ float area(const Candidate& b) {
    return __fmul_rn(fmaxf(__fsub_rn(b.x2, b.x1), 0.f), fmaxf(__fsub_rn(b.y2, b.y1), 0.f));
}

// calib.detection.nms keeps a box while iou <= threshold, so anything else suppresses.
__device__ __forceinline__ bool suppresses(const Candidate& a, float area_a, const Candidate& b, float threshold) {
    const float w = fmaxf(__fsub_rn(fminf(a.x2, b.x2), fmaxf(a.x1, b.x1)), 0.f);
    const float h = fmaxf(__fsub_rn(fminf(a.y2, b.y2), fmaxf(a.y1, b.y1)), 0.f);
    const float inter = __fmul_rn(w, h);
    const float uni = __fsub_rn(__fadd_rn(area_a, area(b)), inter);
    const float iou = uni > 0.f ? __fdiv_rn(inter, fmaxf(uni, 1e-12f)) : 0.f;
    return !(iou <= threshold);
}

__device__ __forceinline__ float to_original(float v, double offset, double scale, double limit) {
    const double x = __ddiv_rn(__dsub_rn((double)v, offset), scale);
    return __double2float_rn(fmin(fmax(x, 0.0), limit));
}

// Greedy NMS over the sorted candidates, one block per image. transforms: per image
// (scale_x, scale_y, offset_x, offset_y, width, height), used when map_boxes is set.
extern "C" __global__ void yolo_nms(const Candidate* sorted, const int* count, int A, float threshold, int agnostic,
                                    int K, const double* transforms, int map_boxes, unsigned char* removed,
                                    float* out_boxes, float* out_scores, int* out_classes, int* out_count) {
    __shared__ int kept;
    const int n = blockIdx.x, t = threadIdx.x, m = min(count[n], A);
    const Candidate* c = sorted + (size_t)n * A;
    unsigned char* gone = removed + (size_t)n * A;
    const double* tf = transforms + 6 * n;
    if (t == 0) kept = 0;
    for (int i = 0; i < m; ++i) {
        __syncthreads();  // the previous round's marks and count are visible to every thread
        if (kept >= K) break;
        if (gone[i]) continue;
        const Candidate ci = c[i];
        const float area_i = area(ci);
        if (t == 0) {
            const size_t o = (size_t)n * K + kept;
            float* box = out_boxes + 4 * o;
            if (map_boxes) {
                box[0] = to_original(ci.x1, tf[2], tf[0], tf[4]);
                box[1] = to_original(ci.y1, tf[3], tf[1], tf[5]);
                box[2] = to_original(ci.x2, tf[2], tf[0], tf[4]);
                box[3] = to_original(ci.y2, tf[3], tf[1], tf[5]);
            } else {
                box[0] = ci.x1; box[1] = ci.y1; box[2] = ci.x2; box[3] = ci.y2;
            }
            out_scores[o] = ci.score;
            out_classes[o] = ci.cls;
        }
        for (int j = i + 1 + t; j < m; j += blockDim.x) {
            if (gone[j]) continue;
            const Candidate cj = c[j];
            if ((agnostic || cj.cls == ci.cls) && suppresses(ci, area_i, cj, threshold)) gone[j] = 1;
        }
        __syncthreads();  // everyone has read kept before it moves on
        if (t == 0) ++kept;
    }
    __syncthreads();
    const int total = kept;
    for (int o = total + t; o < K; o += blockDim.x) {
        const size_t q = (size_t)n * K + o;
        out_boxes[4 * q] = 0.f; out_boxes[4 * q + 1] = 0.f; out_boxes[4 * q + 2] = 0.f; out_boxes[4 * q + 3] = 0.f;
        out_scores[q] = 0.f;
        out_classes[q] = -1;
    }
    if (t == 0) out_count[n] = total;
}
