// activations.cuh: the activation table of gpubp/activations.py as float32 device functions.
//
// Ids mirror gpubp.activations.TABLE (the Python side checks that every id in the table has
// kernel instantiations). Each activation is selected at compile time by a template
// parameter, so a kernel carries only the code of its own activation.
//
//   act_f<ACT>(z, p0, p1)           a = f(z)
//   act_df<ACT>(z, a, p0, p1)       f'(z), reading z or a as gpubp's "saves" column says
//   act_dz<ACT, SRC>(da, s, p0, p1) dz = da * f'(z) from the saved value s (z or a)
//   act_dz_mask<ACT>(da, bit, p0)   dz for relu / leaky_relu from the 1-bit mask (bit = z > 0)
//
// Parameters (runtime kernel arguments, float32): leaky_relu p0 = slope; elu p0 = alpha;
// softplus p0 = beta, p1 = threshold; the other activations ignore them.
//
// Numerics follow the reference: exponentials only ever see non-positive arguments; softplus
// switches to the identity above its threshold; gelu uses erff; gelu_tanh clips z to 1e6 so
// z^3 stays finite; the gelu pdf clips z to 40 so z*z stays finite. A NaN z gives a NaN a
// (as numpy.maximum / numpy.where do), never a silent 0. Branches that NumPy writes with
// numpy.where (relu, leaky_relu, elu, softplus) are selects here too, so a huge da times a
// zero derivative is 0, not NaN.
#pragma once

namespace gpubp {

// Activation ids (gpubp.activations.TABLE[name].id).
enum ActId : int {
    ACT_IDENTITY = 0,
    ACT_RELU = 1,
    ACT_LEAKY_RELU = 2,
    ACT_ELU = 3,
    ACT_SIGMOID = 4,
    ACT_TANH = 5,
    ACT_GELU = 6,
    ACT_GELU_TANH = 7,
    ACT_SILU = 8,
    ACT_SOFTPLUS = 9,
};

// What the forward pass writes besides a, and what the backward pass reads besides da.
//   SAVED_NONE  nothing (inference, or identity whose f' is 1)
//   SAVED_Z     z = x @ W + b, float32 (N, out)
//   SAVED_A     a itself (sigmoid, tanh): forward writes nothing extra
//   SAVED_MASK  bit j % 32 of word [n, j / 32] is (z[n, j] > 0): uint32 (N, ceil(out / 32))
enum SavedKind : int { SAVED_NONE = 0, SAVED_Z = 1, SAVED_A = 2, SAVED_MASK = 3 };

inline constexpr float kInvSqrt2 = 0.70710678118654752440f;     // 1 / sqrt(2)
inline constexpr float kInvSqrt2Pi = 0.39894228040143267794f;   // 1 / sqrt(2 pi)
inline constexpr float kSqrt2OverPi = 0.79788456080286535588f;  // sqrt(2 / pi)
inline constexpr float kGeluC = 0.044715f;

// Stable logistic: e = exp(-|z|) <= 1; 1 / (1 + e) for z >= 0, e / (1 + e) below.
__device__ __forceinline__ float sigmoidf_stable(float z) {
    const float e = expf(-fabsf(z));
    return z >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

// gelu_tanh: u = k (zc + c zc^3) with zc = clip(z, -1e6, 1e6).
__device__ __forceinline__ float gelu_tanh_clip(float z) { return fminf(fmaxf(z, -1.0e6f), 1.0e6f); }

template <int ACT>
__device__ __forceinline__ float act_f(float z, float p0, float p1) {
    if constexpr (ACT == ACT_IDENTITY) {
        return z;
    } else if constexpr (ACT == ACT_RELU) {
        return z < 0.0f ? 0.0f : z;  // NaN stays NaN
    } else if constexpr (ACT == ACT_LEAKY_RELU) {
        return z > 0.0f ? z : p0 * z;
    } else if constexpr (ACT == ACT_ELU) {
        return z > 0.0f ? z : p0 * expm1f(z);  // this branch sees z <= 0 (or NaN) only
    } else if constexpr (ACT == ACT_SIGMOID) {
        return sigmoidf_stable(z);
    } else if constexpr (ACT == ACT_TANH) {
        return tanhf(z);
    } else if constexpr (ACT == ACT_GELU) {
        return 0.5f * z * (1.0f + erff(z * kInvSqrt2));
    } else if constexpr (ACT == ACT_GELU_TANH) {
        // z/2 (1 + tanh u) = z sigmoid(2u): the same function, one expf instead of tanhf (fewer
        // registers in the GEMM epilogue), and no cancellation in 1 + tanh u for u << 0.
        const float zc = gelu_tanh_clip(z);
        const float u = kSqrt2OverPi * (zc + kGeluC * zc * zc * zc);
        return z * sigmoidf_stable(2.0f * u);
    } else if constexpr (ACT == ACT_SILU) {
        return z * sigmoidf_stable(z);
    } else if constexpr (ACT == ACT_SOFTPLUS) {
        const float bz = p0 * z;
        // log(1 + e^bz) = max(bz, 0) + log1p(e^-|bz|): finite for any finite bz.
        const float soft = (fmaxf(bz, 0.0f) + log1pf(expf(-fabsf(bz)))) / p0;
        return bz > p1 ? z : soft;
    } else {
        static_assert(ACT >= 0 && ACT <= 9, "unknown activation id");
        return z;
    }
}

// f'(z). For sigmoid and tanh it is written in terms of a = f(z) (the saved value); for the
// others in terms of z. The unused argument is ignored.
template <int ACT>
__device__ __forceinline__ float act_df(float z, float a, float p0, float p1) {
    if constexpr (ACT == ACT_IDENTITY) {
        return 1.0f;
    } else if constexpr (ACT == ACT_RELU) {
        return z > 0.0f ? 1.0f : 0.0f;
    } else if constexpr (ACT == ACT_LEAKY_RELU) {
        return z > 0.0f ? 1.0f : p0;
    } else if constexpr (ACT == ACT_ELU) {
        return z > 0.0f ? 1.0f : p0 * expf(z);
    } else if constexpr (ACT == ACT_SIGMOID) {
        return a * (1.0f - a);
    } else if constexpr (ACT == ACT_TANH) {
        return 1.0f - a * a;
    } else if constexpr (ACT == ACT_GELU) {
        const float cdf = 0.5f * (1.0f + erff(z * kInvSqrt2));
        const float zc = fminf(fmaxf(z, -40.0f), 40.0f);  // phi(40) underflows to 0; zc*zc finite
        const float pdf = kInvSqrt2Pi * expf(-0.5f * zc * zc);
        return cdf + z * pdf;
    } else if constexpr (ACT == ACT_GELU_TANH) {
        const float zc = gelu_tanh_clip(z);
        const float t = tanhf(kSqrt2OverPi * (zc + kGeluC * zc * zc * zc));
        const float du = kSqrt2OverPi * (1.0f + 3.0f * kGeluC * zc * zc);
        return 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * du;
    } else if constexpr (ACT == ACT_SILU) {
        const float s = sigmoidf_stable(z);
        return s * (1.0f + z * (1.0f - s));
    } else if constexpr (ACT == ACT_SOFTPLUS) {
        const float bz = p0 * z;
        return bz > p1 ? 1.0f : sigmoidf_stable(bz);
    } else {
        static_assert(ACT >= 0 && ACT <= 9, "unknown activation id");
        return 1.0f;
    }
}

// dz = da * f'(.) from the saved value s: z when SRC == SAVED_Z, a when SRC == SAVED_A, unused
// when SRC == SAVED_NONE (identity). Written as the reference writes each backward.
template <int ACT, int SRC>
__device__ __forceinline__ float act_dz(float da, float s, float p0, float p1) {
    if constexpr (ACT == ACT_IDENTITY) {
        return da;
    } else if constexpr (ACT == ACT_RELU) {
        return s > 0.0f ? da : 0.0f;
    } else if constexpr (ACT == ACT_LEAKY_RELU) {
        return s > 0.0f ? da : da * p0;
    } else if constexpr (ACT == ACT_ELU) {
        return s > 0.0f ? da : da * p0 * expf(fminf(s, 0.0f));
    } else if constexpr (ACT == ACT_SIGMOID) {
        return da * s * (1.0f - s);
    } else if constexpr (ACT == ACT_TANH) {
        return da * (1.0f - s * s);
    } else if constexpr (ACT == ACT_SOFTPLUS) {
        return p0 * s > p1 ? da : da * sigmoidf_stable(p0 * s);
    } else {
        return da * act_df<ACT>(s, s, p0, p1);  // gelu, gelu_tanh, silu: from z
    }
}

// dz from the 1-bit mask (relu, leaky_relu): bit is z > 0.
template <int ACT>
__device__ __forceinline__ float act_dz_mask(float da, bool bit, float p0) {
    static_assert(ACT == ACT_RELU || ACT == ACT_LEAKY_RELU, "the mask holds z > 0: relu / leaky_relu only");
    if constexpr (ACT == ACT_RELU) {
        return bit ? da : 0.0f;
    } else {
        return bit ? da : da * p0;
    }
}

// Which saved kind each (activation, source) pair accepts, checked at compile time.
template <int ACT, int SRC>
struct SavedOk {
    static constexpr bool value =
        (ACT == ACT_IDENTITY) ? (SRC == SAVED_NONE)
        : (ACT == ACT_SIGMOID || ACT == ACT_TANH) ? (SRC == SAVED_A)
        : (ACT == ACT_RELU || ACT == ACT_LEAKY_RELU) ? (SRC == SAVED_Z || SRC == SAVED_MASK)
                                                     : (SRC == SAVED_Z);
};

}  // namespace gpubp
