// plot.h — a small PNG plotting library for the study's figures (issue 6), header-only, CPU.
//   Canvas     RGB pixels: anti-aliased thick lines and dots, rectangles, text (stb_easy_font, ×2), save_png
//   LineChart  named series on linear or log axes with nice ticks and a legend (loss curves, quality vs
//              FLOPs, decode latency / memory vs context length); NaN points break a line
//   Heatmap    a matrix through a viridis-like colormap with a colorbar (attention, the SSD's mixing
//              matrix, NIAH accuracy by length and depth); NaN cells grey
//   BarChart   named bars
// Typical use:
//   plot::LineChart c;  c.title = "loss";  c.xlabel = "step";  c.log_y = true;
//   c.add("hybrid", steps, loss);  c.add("attention", steps, loss2).markers = true;
//   c.save_png("runs/loss.png");
#pragma once
#include <algorithm>  // std::min, std::max, std::clamp, std::swap
#include <cerrno>     // errno: why a file could not be written
#include <cmath>      // std::floor, std::ceil, std::log10, std::pow, std::isfinite, NAN
#include <cstdint>    // uint8_t
#include <cstdio>     // std::FILE, std::fopen, std::fwrite, std::fclose, std::remove, std::snprintf
#include <cstring>    // std::memcpy, std::strerror
#include <string>     // std::string
#include <vector>     // std::vector
#include "model/common.h"  // hl::Error, HL_CHECK

// stb: the PNG writer's implementation is compiled here, static, so every translation unit that includes
// this header gets its own private copy (no link clashes, no separate .cpp). stb's own code triggers a few
// -Wall/-Wextra warnings; they are silenced for stb only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wunused-function"
#ifndef STB_IMAGE_WRITE_STATIC
#define STB_IMAGE_WRITE_STATIC
#endif
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb/stb_image_write.h>  // stbi_write_png_to_func
#include <stb/stb_easy_font.h>    // stb_easy_font_print, stb_easy_font_width: a tiny bitmap font as quads
#pragma GCC diagnostic pop

namespace hl::plot {

// ---------------------------------------------------------------- colours

struct Rgb {
    uint8_t r = 0, g = 0, b = 0;
    bool operator==(const Rgb& o) const { return r == o.r && g == o.g && b == o.b; }
    bool operator!=(const Rgb& o) const { return !(*this == o); }
};

constexpr Rgb WHITE{255, 255, 255};
constexpr Rgb BLACK{0, 0, 0};
constexpr Rgb INK{40, 40, 40};        // text, axes
constexpr Rgb GRID{228, 228, 228};    // grid lines behind the data
constexpr Rgb MISSING{170, 170, 170}; // masked (NaN) heatmap cells

// Series colours: the usual "category10" hues, then six darker ones (a study draws twelve families), cycled.
inline Rgb palette(int i) {
    constexpr int n = 16;
    static const Rgb colors[n] = {{31, 119, 180}, {255, 127, 14}, {44, 160, 44},  {214, 39, 40},
                                  {148, 103, 189}, {140, 86, 75}, {227, 119, 194}, {127, 127, 127},
                                  {188, 189, 34},  {23, 190, 207}, {0, 0, 0},     {0, 60, 140},
                                  {130, 0, 0},     {0, 110, 90},  {200, 0, 200},  {110, 90, 0}};
    return colors[((i % n) + n) % n];
}

// A viridis-like colormap, t in [0, 1]: dark purple → blue → teal → green → yellow, lightness rising
// monotonically (so it reads in greyscale and for colour-blind readers). Each channel is a quintic
// least-squares fit to nine viridis colours at t = 0, 1/8, …, 1 (#440154 #472d7b #3b528b #2c728e #21918c
// #28ae80 #5ec962 #addc30 #fde725), the two ends weighted ×100 so that they come out exact; the fit is
// within 4/255 of every anchor.
inline Rgb colormap(double t) {
    t = std::isfinite(t) ? std::clamp(t, 0.0, 1.0) : 0.0;
    static const double coef[3][6] = {
        {0.266677, 0.037361, 1.43655, -13.331017, 23.987093, -11.404508},   // red
        {0.003919, 1.585171, -1.893797, 2.950247, -2.195, 0.455338},        // green
        {0.329392, 2.283324, -10.908325, 27.734916, -33.595482, 14.301251}, // blue
    };
    uint8_t ch[3];
    for (int c = 0; c < 3; c++) {
        double v = 0;
        for (int k = 5; k >= 0; k--) v = v * t + coef[c][k];  // Horner
        ch[c] = uint8_t(std::lround(std::clamp(v, 0.0, 1.0) * 255.0));
    }
    return {ch[0], ch[1], ch[2]};
}

// Relative luminance in [0, 1] (for picking black or white text on a coloured cell).
inline double luminance(Rgb c) { return (0.2126 * c.r + 0.7152 * c.g + 0.0722 * c.b) / 255.0; }

// ---------------------------------------------------------------- canvas

// A pixel rectangle: columns x .. x+w-1, rows y .. y+h-1.
struct Rect {
    int x = 0, y = 0, w = 0, h = 0;
    bool contains(double px, double py) const { return px >= x && px < x + w && py >= y && py < y + h; }
};

enum class Align { Start, Center, End };  // horizontal: left/centre/right; vertical: top/middle/bottom

constexpr int TEXT_SCALE = 2;                  // stb_easy_font's 1-pixel strokes, doubled for readability
constexpr int TEXT_H = 7 * TEXT_SCALE;         // height of capitals and digits (descenders hang below)

// An RGB image, row 0 at the top. Pixel (x, y) covers [x, x+1) × [y, y+1), so its centre is (x+.5, y+.5);
// geometry takes doubles in those coordinates. Drawing outside the canvas (or outside `clip`) is ignored.
struct Canvas {
    int width = 0, height = 0;
    std::vector<uint8_t> rgb;  // (height, width, 3)
    Rect clip;                 // drawing is limited to this rectangle (the whole canvas by default)

    Canvas(int w, int h, Rgb background = WHITE) : width(w), height(h) {
        HL_CHECK(w > 0 && h > 0 && w <= 16384 && h <= 16384, "plot: bad canvas size ", w, "x", h);
        rgb.resize(size_t(w) * h * 3);
        for (size_t i = 0; i < rgb.size(); i += 3) {
            rgb[i] = background.r;
            rgb[i + 1] = background.g;
            rgb[i + 2] = background.b;
        }
        reset_clip();
    }
    void reset_clip() { clip = {0, 0, width, height}; }

    Rgb get(int x, int y) const {
        HL_CHECK(x >= 0 && x < width && y >= 0 && y < height, "plot: pixel (", x, ", ", y, ") is off the ",
                 width, "x", height, " canvas");
        const uint8_t* p = &rgb[(size_t(y) * width + x) * 3];
        return {p[0], p[1], p[2]};
    }
    void set(int x, int y, Rgb c) {
        if (!clip.contains(x, y) || x < 0 || y < 0 || x >= width || y >= height) return;
        uint8_t* p = &rgb[(size_t(y) * width + x) * 3];
        p[0] = c.r, p[1] = c.g, p[2] = c.b;
    }
    // Paints c over the pixel with opacity alpha in [0, 1] (anti-aliased edges).
    void blend(int x, int y, Rgb c, double alpha) {
        if (!(alpha > 0) || !clip.contains(x, y) || x < 0 || y < 0 || x >= width || y >= height) return;
        if (alpha >= 1) return set(x, y, c);
        uint8_t* p = &rgb[(size_t(y) * width + x) * 3];
        auto mix = [alpha](uint8_t under, uint8_t over) {
            return uint8_t(std::lround(under + alpha * (double(over) - under)));
        };
        p[0] = mix(p[0], c.r), p[1] = mix(p[1], c.g), p[2] = mix(p[2], c.b);
    }

    // Pixels x0 <= x < x1, y0 <= y < y1.
    void fill_rect(int x0, int y0, int x1, int y1, Rgb c) {
        x0 = std::max({x0, 0, clip.x}), y0 = std::max({y0, 0, clip.y});
        x1 = std::min({x1, width, clip.x + clip.w}), y1 = std::min({y1, height, clip.y + clip.h});
        for (int y = y0; y < y1; y++)
            for (int x = x0; x < x1; x++) set(x, y, c);
    }
    // A 1-pixel outline just inside the rectangle.
    void stroke_rect(const Rect& r, Rgb c) {
        fill_rect(r.x, r.y, r.x + r.w, r.y + 1, c);
        fill_rect(r.x, r.y + r.h - 1, r.x + r.w, r.y + r.h, c);
        fill_rect(r.x, r.y, r.x + 1, r.y + r.h, c);
        fill_rect(r.x + r.w - 1, r.y, r.x + r.w, r.y + r.h, c);
    }

    // An anti-aliased segment with round caps: every pixel whose centre lies within thickness/2 of the
    // segment is fully painted, with a one-pixel soft edge beyond. Each row only visits the columns the
    // segment can reach, so long lines cost their area, not their bounding box.
    void line(double x0, double y0, double x1, double y1, Rgb c, double thickness = 1.0) {
        if (!std::isfinite(x0) || !std::isfinite(y0) || !std::isfinite(x1) || !std::isfinite(y1)) return;
        const double r = 0.5 * thickness, reach = r + 0.5;
        const double dx = x1 - x0, dy = y1 - y0, len2 = dx * dx + dy * dy;
        const int ya = std::max(0, int(std::floor(std::min(y0, y1) - reach)));
        const int yb = std::min(height - 1, int(std::ceil(std::max(y0, y1) + reach)));
        for (int y = ya; y <= yb; y++) {
            const double cy = y + 0.5;
            // the part of the segment (parameter t in [ta, tb]) within `reach` of this row's centre line
            double ta = 0, tb = 1;
            if (dy != 0) {
                ta = (cy - reach - y0) / dy, tb = (cy + reach - y0) / dy;
                if (ta > tb) std::swap(ta, tb);
                ta = std::max(ta, 0.0), tb = std::min(tb, 1.0);
                if (ta > tb) continue;
            } else if (std::fabs(cy - y0) > reach) {
                continue;
            }
            double xa = x0 + ta * dx, xb = x0 + tb * dx;
            if (xa > xb) std::swap(xa, xb);
            const int xs = std::max(0, int(std::floor(xa - reach)));
            const int xe = std::min(width - 1, int(std::ceil(xb + reach)));
            for (int x = xs; x <= xe; x++) {
                const double cx = x + 0.5;
                double t = len2 > 0 ? ((cx - x0) * dx + (cy - y0) * dy) / len2 : 0.0;
                t = std::clamp(t, 0.0, 1.0);
                const double d = std::hypot(cx - (x0 + t * dx), cy - (y0 + t * dy));
                blend(x, y, c, std::clamp(r + 0.5 - d, 0.0, 1.0));
            }
        }
    }
    // A filled, anti-aliased disc.
    void dot(double cx, double cy, double radius, Rgb c) { line(cx, cy, cx, cy, c, 2 * radius); }

    // ---- text (printable ASCII; anything else is drawn as '?')
    // stb_easy_font draws glyphs as axis-aligned quads in font units (capitals 7 units high); we scale
    // them by TEXT_SCALE and fill them as rectangles.
    struct Quad {
        float x0, y0, x1, y1;  // font units, relative to the text's top-left
    };
    static std::string printable(const std::string& s) {
        std::string out = s;
        for (char& ch : out)
            if (ch != '\n' && (static_cast<unsigned char>(ch) < 32 || static_cast<unsigned char>(ch) > 126)) ch = '?';
        return out;
    }
    static std::vector<Quad> glyph_quads(const std::string& s) {
        std::string text = printable(s);
        std::vector<char> buf(text.size() * 1024 + 64);  // 64 bytes per quad; a glyph has at most ~14 quads
        const int n = stb_easy_font_print(0, 0, text.data(), nullptr, buf.data(), int(buf.size()));
        std::vector<Quad> quads(n);
        for (int q = 0; q < n; q++) {
            // four vertices of 16 bytes (x, y, z floats, rgba); vertices 0 and 2 are opposite corners
            float v0[2], v2[2];
            std::memcpy(v0, buf.data() + q * 64, sizeof v0);
            std::memcpy(v2, buf.data() + q * 64 + 32, sizeof v2);
            quads[q] = {v0[0], v0[1], v2[0], v2[1]};
        }
        return quads;
    }
    // Width in pixels of the text's widest line (without the last glyph's trailing gap).
    static int text_width(const std::string& s, int scale = TEXT_SCALE) {
        if (s.empty()) return 0;
        std::string text = printable(s);
        return std::max(0, stb_easy_font_width(text.data()) - 1) * scale;
    }
    // Height in pixels from the top of the first line to the baseline of the last (descenders excluded).
    static int text_height(const std::string& s, int scale = TEXT_SCALE) {
        int lines = 1;
        for (char ch : s) lines += ch == '\n';
        return ((lines - 1) * 12 + 7) * scale;
    }
    // Draws text with its box (text_width × text_height) aligned to (x, y): h picks left/centre/right,
    // v picks top/middle/bottom.
    void text(double x, double y, const std::string& s, Rgb c, Align h = Align::Start, Align v = Align::Start,
              int scale = TEXT_SCALE) {
        const int w = text_width(s, scale), ht = text_height(s, scale);
        const int left = int(std::lround(x - (h == Align::Center ? w / 2.0 : h == Align::End ? w : 0)));
        const int top = int(std::lround(y - (v == Align::Center ? ht / 2.0 : v == Align::End ? ht : 0)));
        for (const Quad& q : glyph_quads(s))
            fill_rect(left + int(std::lround(q.x0 * scale)), top + int(std::lround(q.y0 * scale)),
                      left + int(std::lround(q.x1 * scale)), top + int(std::lround(q.y1 * scale)), c);
    }
    // Text turned 90° counter-clockwise (reading upwards), its box centred at (cx, cy): y-axis labels.
    void text_up(double cx, double cy, const std::string& s, Rgb c, int scale = TEXT_SCALE) {
        const int w = text_width(s, scale), ht = text_height(s, scale);
        // the text's top-left corner lands at the bottom-left; text x runs up, text y runs right
        const int left = int(std::lround(cx - ht / 2.0)), bottom = int(std::lround(cy + w / 2.0));
        for (const Quad& q : glyph_quads(s))
            fill_rect(left + int(std::lround(q.y0 * scale)), bottom - int(std::lround(q.x1 * scale)),
                      left + int(std::lround(q.y1 * scale)), bottom - int(std::lround(q.x0 * scale)), c);
    }

    // The file is opened first, so a bad path fails fast with the system's reason; stb encodes into it.
    void save_png(const std::string& path) const {
        std::FILE* f = std::fopen(path.c_str(), "wb");
        HL_CHECK(f != nullptr, "plot: could not write PNG '", path, "': ", std::strerror(errno));
        struct Sink {
            std::FILE* f;
            bool ok;
        } sink{f, true};
        auto put = [](void* ctx, void* data, int size) {
            Sink* s = static_cast<Sink*>(ctx);
            s->ok = s->ok && std::fwrite(data, 1, size_t(size), s->f) == size_t(size);
        };
        const bool encoded = stbi_write_png_to_func(put, &sink, width, height, 3, rgb.data(), width * 3) != 0;
        const bool closed = std::fclose(f) == 0;
        if (!(encoded && sink.ok && closed)) std::remove(path.c_str());  // no truncated PNG left behind
        HL_CHECK(encoded, "plot: could not encode PNG '", path, "' (", width, "x", height, ")");
        HL_CHECK(sink.ok && closed, "plot: could not write PNG '", path, "': ", std::strerror(errno));
    }
};

// ---------------------------------------------------------------- ticks

// Ticks for a linear axis: the multiples of a 1-, 2- or 5×10^k step inside [lo, hi], the step chosen so
// that their count is closest to `target` (ties: the finer step).
inline std::vector<double> nice_ticks(double lo, double hi, int target = 6) {
    HL_CHECK(std::isfinite(lo) && std::isfinite(hi) && lo <= hi, "plot: bad tick range [", lo, ", ", hi, "]");
    if (lo == hi) return {lo};
    target = std::max(target, 2);
    const double base = std::pow(10.0, std::floor(std::log10((hi - lo) / target)));
    double best_step = base;
    long best_diff = -1;
    for (double m : {1.0, 2.0, 5.0, 10.0}) {
        const double step = m * base;
        const long count = long(std::floor(hi / step + 1e-9)) - long(std::ceil(lo / step - 1e-9)) + 1;
        const long diff = std::labs(count - target);
        if (best_diff < 0 || diff < best_diff) best_diff = diff, best_step = step;
    }
    std::vector<double> ticks;
    const long first = long(std::ceil(lo / best_step - 1e-9)), last = long(std::floor(hi / best_step + 1e-9));
    for (long i = first; i <= last; i++) ticks.push_back(i == 0 ? 0.0 : double(i) * best_step);
    return ticks;
}

// Ticks for a log axis over [lo, hi], 0 < lo <= hi: powers of ten (every k-th when there are many
// decades); with fewer than three of those, 1-2-5 × 10^k, then 1…9 × 10^k; failing that (a narrow range
// inside a decade), linear nice ticks.
inline std::vector<double> log_ticks(double lo, double hi, int target = 6) {
    HL_CHECK(std::isfinite(lo) && std::isfinite(hi) && lo > 0 && lo <= hi, "plot: bad log tick range [", lo,
             ", ", hi, "]");
    const double eps = 1e-9;
    const int e0 = int(std::ceil(std::log10(lo) - eps)), e1 = int(std::floor(std::log10(hi) + eps));
    std::vector<double> ticks;
    if (e1 - e0 + 1 >= 3) {
        const int every = std::max(1, (e1 - e0 + target) / target);  // about `target` labels at most
        for (int e = e0; e <= e1; e++)
            if ((e - e0) % every == 0) ticks.push_back(std::pow(10.0, e));
        return ticks;
    }
    for (const std::vector<double>& mants : {std::vector<double>{1, 2, 5}, std::vector<double>{1, 2, 3, 4, 5, 6, 7, 8, 9}}) {
        ticks.clear();
        for (int e = int(std::floor(std::log10(lo))); e <= e1; e++)
            for (double m : mants) {
                const double v = m * std::pow(10.0, e);
                if (v >= lo * (1 - eps) && v <= hi * (1 + eps)) ticks.push_back(v);
            }
        if (ticks.size() >= 3) return ticks;
    }
    return ticks.size() >= 2 ? ticks : nice_ticks(lo, hi, target);
}

// printf's "2.50e+06" written short: "2.5e6" (numbers without an exponent are returned as they are).
inline std::string tidy_exponent(const std::string& s) {
    const size_t e = s.find_first_of("eE");
    if (e == std::string::npos) return s;
    std::string mant = s.substr(0, e), ex = s.substr(e + 1);
    if (mant.find('.') != std::string::npos) {
        while (mant.back() == '0') mant.pop_back();
        if (mant.back() == '.') mant.pop_back();
    }
    const bool neg = !ex.empty() && ex[0] == '-';
    size_t i = (!ex.empty() && (ex[0] == '-' || ex[0] == '+')) ? 1 : 0;
    while (i + 1 < ex.size() && ex[i] == '0') i++;
    return mant + "e" + (neg ? "-" : "") + ex.substr(i);
}

// Three significant digits, for values that are not tick multiples (a colorbar's ends): "0.00673", "1.5e4".
inline std::string format_short(double v) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.3g", v);
    return tidy_exponent(buf);
}

// A tick label with as many decimals as the tick step needs ("0.25", "100"); on axes with very large or
// very small steps, short scientific notation ("1e-4", "2.5e6").
inline std::string format_tick(double v, double step) {
    step = std::fabs(step) > 0 ? std::fabs(step) : std::fabs(v);
    if (std::fabs(v) < 1e-9 * step || v == 0) return "0";  // rounding noise at zero prints as "0", not "-0.0"
    char buf[64];
    const double a = std::fabs(v);
    if (step >= 1e5 || step < 1e-3) {
        const int digits = std::clamp(int(std::floor(std::log10(a) + 1e-9) - std::floor(std::log10(step) + 1e-9)), 0, 6);
        std::snprintf(buf, sizeof buf, "%.*e", digits, v);
        return tidy_exponent(buf);
    }
    const int decimals = std::clamp(int(std::ceil(-std::log10(step) - 1e-9)), 0, 10);
    std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
    return buf;
}

// ---------------------------------------------------------------- axes

// One axis of a chart: its range in axis units (log10 of the value on a log axis) and its ticks.
struct Axis {
    bool log = false;
    double lo = 0, hi = 1;       // axis units
    std::vector<double> ticks;   // data values
    double step = 1;             // tick step, for labels (0: each tick is its own step)

    double unit(double v) const { return log ? std::log10(v) : v; }
    double frac(double v) const { return (unit(v) - lo) / (hi - lo); }  // 0 at lo, 1 at hi
    std::string label(double tick) const { return format_tick(tick, step > 0 ? step : tick); }
    static bool one_digit(double v) {  // 3, 0.02, 5e6: a single significant digit
        const double mant = v / std::pow(10.0, std::floor(std::log10(v) + 1e-9));
        return std::fabs(mant - std::round(mant)) < 1e-6;
    }

    // From the data's finite min/max (or a fixed range where fixed_lo/fixed_hi are not NaN), with a 5%
    // margin on each free side.
    static Axis make(double dmin, double dmax, bool log, double fixed_lo = NAN, double fixed_hi = NAN,
                     int target = 6) {
        Axis a;
        a.log = log;
        if (log) {
            HL_CHECK(std::isnan(fixed_lo) || fixed_lo > 0, "plot: a log axis needs a positive minimum, got ", fixed_lo);
            HL_CHECK(std::isnan(fixed_hi) || fixed_hi > 0, "plot: a log axis needs a positive maximum, got ", fixed_hi);
        }
        double lo = std::isnan(fixed_lo) ? a.unit(dmin) : a.unit(fixed_lo);
        double hi = std::isnan(fixed_hi) ? a.unit(dmax) : a.unit(fixed_hi);
        if (lo == hi) {  // one value: widen by half a decade (log) or 10% (at least 1) each way
            const double pad = log ? 0.5 : std::max(0.1 * std::fabs(lo), 1.0);
            lo -= pad, hi += pad;
        } else {
            HL_CHECK(lo < hi, "plot: axis minimum ", fixed_lo, " is not below its maximum ", fixed_hi);
            const double margin = 0.05 * (hi - lo);
            if (std::isnan(fixed_lo)) lo -= margin;
            if (std::isnan(fixed_hi)) hi += margin;
        }
        a.lo = lo, a.hi = hi;
        if (!log) {
            a.ticks = nice_ticks(lo, hi, target);
            a.step = a.ticks.size() >= 2 ? a.ticks[1] - a.ticks[0] : std::max(std::fabs(lo), 1.0);
        } else {
            a.ticks = log_ticks(std::pow(10.0, lo), std::pow(10.0, hi), target);
            // 1-2-5 × 10^k ticks are labelled each by itself (step 0); the linear ticks of an axis within a
            // decade (2.6, 2.8, 3.0) all with the decimals of their gap
            a.step = 0;
            for (double t : a.ticks)
                if (!one_digit(t)) a.step = a.ticks.size() >= 2 ? a.ticks[1] - a.ticks[0] : 0;
        }
        return a;
    }
};

namespace detail {

// The plot area left after room for a title, axis labels and tick labels.
inline Rect plot_area(int width, int height, const std::string& title, const std::string& xlabel,
                      const std::string& ylabel, int ytick_w, int right_room) {
    const int pad = 14, tick = 6;
    const int top = pad + (title.empty() ? 6 : TEXT_H + 16);
    const int left = pad + (ylabel.empty() ? 0 : TEXT_H + 14) + ytick_w + tick + 8;
    const int bottom = pad + tick + 8 + TEXT_H + (xlabel.empty() ? 0 : 14 + TEXT_H);
    const int right = std::max(pad + 10, right_room);
    const Rect r{left, top, width - left - right, height - top - bottom};
    HL_CHECK(r.w >= 40 && r.h >= 40, "plot: a ", width, "x", height, " image is too small for its labels");
    return r;
}

// Title above the plot area, x label below the tick labels, y label (turned) left of them.
inline void draw_labels(Canvas& cv, const Rect& area, const std::string& title, const std::string& xlabel,
                        const std::string& ylabel, int ytick_w) {
    if (!title.empty()) cv.text(area.x + area.w / 2.0, area.y - 14, title, INK, Align::Center, Align::End);
    if (!xlabel.empty())
        cv.text(area.x + area.w / 2.0, area.y + area.h + 6 + 8 + TEXT_H + 14, xlabel, INK, Align::Center);
    if (!ylabel.empty()) cv.text_up(area.x - 6 - 8 - ytick_w - 14 - TEXT_H / 2.0, area.y + area.h / 2.0, ylabel, INK);
}

// Grid lines, tick marks and tick labels of a numeric y axis (and x axis when given).
// A label that would touch the previous one is left out (its grid line and tick mark stay).
inline void draw_grid(Canvas& cv, const Rect& area, const Axis* x, const Axis& y) {
    const int tick = 6;
    int last = 1 << 30;  // the previous label's top edge, going up
    for (double t : y.ticks) {
        const int py = area.y + area.h - 1 - int(std::lround(y.frac(t) * (area.h - 1)));
        cv.fill_rect(area.x, py, area.x + area.w, py + 1, GRID);
        cv.fill_rect(area.x - tick, py, area.x, py + 1, INK);
        if (py + TEXT_H / 2 + 4 > last) continue;
        cv.text(area.x - tick - 8, py + 0.5, y.label(t), INK, Align::End, Align::Center);
        last = py - TEXT_H / 2;
    }
    if (!x) return;
    last = -(1 << 30);  // the previous label's right edge
    for (double t : x->ticks) {
        const int px = area.x + int(std::lround(x->frac(t) * (area.w - 1)));
        cv.fill_rect(px, area.y, px + 1, area.y + area.h, GRID);
        cv.fill_rect(px, area.y + area.h, px + 1, area.y + area.h + tick, INK);
        const std::string s = x->label(t);
        const int w = Canvas::text_width(s);
        if (px - w / 2 - 10 < last) continue;
        cv.text(px + 0.5, area.y + area.h + tick + 8, s, INK, Align::Center);
        last = px + w / 2;
    }
}

inline int max_label_width(const Axis& a) {
    int w = 0;
    for (double t : a.ticks) w = std::max(w, Canvas::text_width(a.label(t)));
    return w;
}

}  // namespace detail

// ---------------------------------------------------------------- line chart

struct Series {
    std::string name;
    std::vector<double> x, y;
    Rgb color;
    double thickness = 2.5;
    bool markers = false;  // a dot on every point (for curves of a few points, e.g. quality vs FLOPs)
};

struct LineChart {
    std::string title, xlabel, ylabel;
    bool log_x = false, log_y = false;
    int width = 800, height = 500;
    double x_min = NAN, x_max = NAN, y_min = NAN, y_max = NAN;  // a fixed axis end; NaN: from the data
    std::vector<double> x_ticks, y_ticks;  // explicit ticks (e.g. context lengths 512, 1024, …); else nice ones
    bool legend = true;
    std::vector<Series> series;

    // Adds a series drawn in the next palette colour; the reference (valid until the next add) allows
    // tweaks: c.add(...).markers = true.
    Series& add(const std::string& name, std::vector<double> x, std::vector<double> y) {
        HL_CHECK(x.size() == y.size(), "LineChart: series '", name, "' has ", x.size(), " x values but ", y.size(),
                 " y values");
        series.push_back({name, std::move(x), std::move(y), palette(int(series.size()))});
        return series.back();
    }
    // y against 0, 1, 2, …
    Series& add(const std::string& name, std::vector<double> y) {
        std::vector<double> x(y.size());
        for (size_t i = 0; i < x.size(); i++) x[i] = double(i);
        return add(name, std::move(x), std::move(y));
    }

    // The axes (ranges and ticks) the data gives; throws on non-positive data on a log axis.
    void axes(Axis& ax, Axis& ay) const {
        double xlo = INFINITY, xhi = -INFINITY, ylo = INFINITY, yhi = -INFINITY;
        for (const Series& s : series) {
            HL_CHECK(s.x.size() == s.y.size(), "LineChart: series '", s.name, "' has ", s.x.size(), " x values but ",
                     s.y.size(), " y values");
            for (size_t i = 0; i < s.x.size(); i++) {
                HL_CHECK(!log_x || !(s.x[i] <= 0), "LineChart: log-x axis needs positive x, but series '", s.name,
                         "' has x[", i, "] = ", s.x[i]);
                HL_CHECK(!log_y || !(s.y[i] <= 0), "LineChart: log-y axis needs positive y, but series '", s.name,
                         "' has y[", i, "] = ", s.y[i]);
                if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) continue;
                xlo = std::min(xlo, s.x[i]), xhi = std::max(xhi, s.x[i]);
                ylo = std::min(ylo, s.y[i]), yhi = std::max(yhi, s.y[i]);
            }
        }
        const bool any = xlo <= xhi;
        HL_CHECK(any || (!std::isnan(x_min) && !std::isnan(x_max) && !std::isnan(y_min) && !std::isnan(y_max)),
                 "LineChart '", title, "': no finite points to plot");
        if (!any) xlo = x_min, xhi = x_max, ylo = y_min, yhi = y_max;
        ax = Axis::make(xlo, xhi, log_x, x_min, x_max);
        ay = Axis::make(ylo, yhi, log_y, y_min, y_max);
        set_ticks(ax, x_ticks, "x");
        set_ticks(ay, y_ticks, "y");
    }

    Rect plot_area() const {
        Axis ax, ay;
        axes(ax, ay);
        return plot_area(ax, ay);
    }
    Rect plot_area(const Axis& ax, const Axis& ay) const {
        const int last_w = ax.ticks.empty() ? 0 : Canvas::text_width(ax.label(ax.ticks.back()));
        return detail::plot_area(width, height, title, xlabel, ylabel, detail::max_label_width(ay), last_w / 2 + 8);
    }

    Canvas render() const {
        Axis ax, ay;
        axes(ax, ay);
        const Rect area = plot_area(ax, ay);
        Canvas cv(width, height);
        detail::draw_grid(cv, area, &ax, ay);
        auto px = [&](double x) { return area.x + 0.5 + ax.frac(x) * (area.w - 1); };
        auto py = [&](double y) { return area.y + area.h - 0.5 - ay.frac(y) * (area.h - 1); };
        auto ok = [](const Series& s, size_t i) { return std::isfinite(s.x[i]) && std::isfinite(s.y[i]); };

        cv.clip = area;
        for (const Series& s : series) {
            const size_t n = s.x.size();
            for (size_t i = 0; i < n; i++) {
                if (!ok(s, i)) continue;
                if (i + 1 < n && ok(s, i + 1))
                    cv.line(px(s.x[i]), py(s.y[i]), px(s.x[i + 1]), py(s.y[i + 1]), s.color, s.thickness);
                const bool alone = (i == 0 || !ok(s, i - 1)) && (i + 1 >= n || !ok(s, i + 1));
                if (s.markers || alone) cv.dot(px(s.x[i]), py(s.y[i]), s.thickness + 1.5, s.color);
            }
        }
        cv.reset_clip();
        cv.stroke_rect({area.x - 1, area.y - 1, area.w + 2, area.h + 2}, INK);
        detail::draw_labels(cv, area, title, xlabel, ylabel, detail::max_label_width(ay));
        if (legend) draw_legend(cv, area, px, py);
        return cv;
    }
    void save_png(const std::string& path) const { render().save_png(path); }

  private:
    // Explicit ticks replace the automatic ones; those outside the axis range are dropped.
    static void set_ticks(Axis& a, const std::vector<double>& ticks, const char* which) {
        if (ticks.empty()) return;
        a.ticks.clear();
        for (double t : ticks) {
            HL_CHECK(std::isfinite(t) && (!a.log || t > 0), "LineChart: bad ", which, " tick ", t,
                     a.log ? " on a log axis" : "");
            const double f = a.frac(t);
            if (f >= -1e-9 && f <= 1 + 1e-9) a.ticks.push_back(t);
        }
        // labels: each by itself when all have one significant digit, else all with the decimals the finest needs
        bool round = true;
        int decimals = 0;
        for (double t : a.ticks) {
            round = round && (t == 0 || Axis::one_digit(std::fabs(t)));
            for (double sc = std::pow(10.0, decimals); decimals < 6 && std::fabs(t * sc - std::round(t * sc)) > 1e-6;)
                decimals++, sc *= 10;
        }
        a.step = round ? 0 : std::pow(10.0, -decimals);
    }

    // A boxed legend in whichever corner of the plot area covers the fewest data points.
    template <typename PX, typename PY>
    void draw_legend(Canvas& cv, const Rect& area, PX px, PY py) const {
        std::vector<const Series*> named;
        for (const Series& s : series)
            if (!s.name.empty()) named.push_back(&s);
        if (named.empty()) return;
        const int swatch = 28, pad = 10, row = TEXT_H + 10;
        int text_w = 0;
        for (const Series* s : named) text_w = std::max(text_w, Canvas::text_width(s->name));
        const int w = pad + swatch + 8 + text_w + pad, h = pad + int(named.size()) * row - 10 + pad;
        const int inset = 10;
        const Rect corners[4] = {{area.x + area.w - w - inset, area.y + inset, w, h},
                                 {area.x + inset, area.y + inset, w, h},
                                 {area.x + area.w - w - inset, area.y + area.h - h - inset, w, h},
                                 {area.x + inset, area.y + area.h - h - inset, w, h}};
        Rect box = corners[0];
        long best = -1;
        for (const Rect& r : corners) {
            long covered = 0;
            for (const Series& s : series)
                for (size_t i = 0; i < s.x.size(); i++)
                    covered += std::isfinite(s.x[i]) && std::isfinite(s.y[i]) && r.contains(px(s.x[i]), py(s.y[i]));
            if (best < 0 || covered < best) best = covered, box = r;
        }
        cv.fill_rect(box.x, box.y, box.x + box.w, box.y + box.h, WHITE);
        cv.stroke_rect(box, Rgb{190, 190, 190});
        for (size_t k = 0; k < named.size(); k++) {
            const double cy = box.y + pad + k * row + TEXT_H / 2.0;
            const Series& s = *named[k];
            cv.line(box.x + pad, cy, box.x + pad + swatch, cy, s.color, s.thickness);
            if (s.markers) cv.dot(box.x + pad + swatch / 2.0, cy, s.thickness + 1.5, s.color);
            cv.text(box.x + pad + swatch + 8, cy, s.name, INK, Align::Start, Align::Center);
        }
    }
};

// ---------------------------------------------------------------- heatmap

struct Heatmap {
    std::string title, xlabel, ylabel;
    int rows = 0, cols = 0;
    std::vector<double> values;                       // (rows, cols) row-major; row 0 drawn at the top
    std::vector<std::string> row_labels, col_labels;  // optional, one per row / column (else indices)
    double vmin = NAN, vmax = NAN;                    // colour range; NaN: the data's min / max
    bool mask_nan = true;                             // NaN cells drawn grey; false: a NaN is an error
    bool annotate = false;                            // print each cell's value (small grids: NIAH)
    std::string value_format = "%.2f";                // printf format for annotate
    int max_side = 480;                               // the matrix area's longest side, pixels

    Heatmap() = default;
    Heatmap(int rows_, int cols_, std::vector<double> values_)
        : rows(rows_), cols(cols_), values(std::move(values_)) {}

    double at(int r, int c) const { return values[size_t(r) * cols + c]; }

    void check() const {
        HL_CHECK(rows > 0 && cols > 0, "Heatmap: bad shape ", rows, "x", cols);
        HL_CHECK(values.size() == size_t(rows) * cols, "Heatmap: ", rows, "x", cols, " needs ", size_t(rows) * cols,
                 " values, got ", values.size());
        HL_CHECK(row_labels.empty() || int(row_labels.size()) == rows, "Heatmap: ", row_labels.size(),
                 " row labels for ", rows, " rows");
        HL_CHECK(col_labels.empty() || int(col_labels.size()) == cols, "Heatmap: ", col_labels.size(),
                 " column labels for ", cols, " columns");
        for (size_t i = 0; i < values.size(); i++)
            HL_CHECK(mask_nan || !std::isnan(values[i]), "Heatmap: value (", i / cols, ", ", i % cols,
                     ") is NaN (set mask_nan to draw NaN cells grey)");
    }
    // The colour range: vmin/vmax where set, else the finite data's min/max (0..1 when there is none).
    void range(double& lo, double& hi) const {
        lo = INFINITY, hi = -INFINITY;
        for (double v : values)
            if (std::isfinite(v)) lo = std::min(lo, v), hi = std::max(hi, v);
        if (lo > hi) lo = 0, hi = 1;
        if (!std::isnan(vmin)) lo = vmin;
        if (!std::isnan(vmax)) hi = vmax;
        HL_CHECK(lo <= hi, "Heatmap: vmin ", lo, " is above vmax ", hi);
    }
    Rgb color(double v, double lo, double hi) const {
        if (std::isnan(v)) return MISSING;
        return colormap(hi > lo ? (v - lo) / (hi - lo) : 0.5);
    }

    // Tick positions (cell indices) and their labels: given labels thinned so they do not collide, or
    // nice integer indices.
    static void index_ticks(int n, const std::vector<std::string>& labels, double cell_px, bool horizontal,
                            std::vector<int>& at, std::vector<std::string>& text) {
        at.clear(), text.clear();
        if (!labels.empty()) {
            int need = TEXT_H + 6;
            if (horizontal)
                for (const auto& l : labels) need = std::max(need, Canvas::text_width(l) + 12);
            const int stride = std::max(1, int(std::ceil(need / cell_px)));
            for (int i = 0; i < n; i += stride) at.push_back(i), text.push_back(labels[i]);
            return;
        }
        for (double t : nice_ticks(0, n - 1, std::max(2, std::min(n, 6)))) {
            const double r = std::round(t);
            if (std::fabs(r - t) > 1e-9) continue;  // only whole indices (steps below 1 are dropped)
            at.push_back(int(r)), text.push_back(std::to_string(int(r)));
        }
        if (at.empty()) at.push_back(0), text.push_back("0");
    }

    // Geometry: the matrix area (square cells when they are at least a pixel), then labels around it.
    struct Layout {
        Rect area, bar;  // matrix, colorbar
        std::vector<int> row_at, col_at;
        std::vector<std::string> row_text, col_text;
        std::vector<double> bar_at;  // colorbar labels: its two ends, and the nice ticks between them
        std::vector<std::string> bar_text;
        double lo = 0, hi = 1;
        int width = 0, height = 0;
    };
    Layout layout() const {
        check();
        Layout L;
        range(L.lo, L.hi);
        const int longest = std::max(rows, cols);
        const int cell = std::max(1, max_side / longest);
        int aw = cols * cell, ah = rows * cell;
        if (longest > max_side) aw = std::max(1, int(double(cols) * max_side / longest)),
                                ah = std::max(1, int(double(rows) * max_side / longest));
        index_ticks(rows, row_labels, double(ah) / rows, false, L.row_at, L.row_text);
        index_ticks(cols, col_labels, double(aw) / cols, true, L.col_at, L.col_text);
        int row_w = 0;
        for (const auto& t : L.row_text) row_w = std::max(row_w, Canvas::text_width(t));
        const int bar_h = std::max(ah, 120);
        colorbar_labels(L, bar_h);
        int bar_w = 0;
        for (const auto& t : L.bar_text) bar_w = std::max(bar_w, Canvas::text_width(t));

        const int pad = 14, tick = 6;
        const int left = pad + (ylabel.empty() ? 0 : TEXT_H + 14) + row_w + tick + 8;
        const int top = pad + (title.empty() ? 6 : TEXT_H + 16);
        const int title_w = Canvas::text_width(title), xlabel_w = Canvas::text_width(xlabel);
        L.area = {left, top, aw, ah};
        L.bar = {left + aw + 24, top, 20, bar_h};
        L.width = std::max({L.bar.x + L.bar.w + tick + 8 + bar_w + pad, left + title_w + pad, left + xlabel_w + pad});
        L.height = top + std::max(ah + tick + 8 + TEXT_H + (xlabel.empty() ? 0 : 14 + TEXT_H), bar_h + TEXT_H / 2) + pad;
        return L;
    }
    Rect plot_area() const { return layout().area; }

    Canvas render() const {
        const Layout L = layout();
        Canvas cv(L.width, L.height);
        const Rect& a = L.area;
        // each pixel shows the mean of the (non-NaN) cells under it: one cell when cells are ≥ 1 pixel
        for (int py = 0; py < a.h; py++) {
            const int r0 = int(int64_t(py) * rows / a.h), r1 = std::max(r0 + 1, int(int64_t(py + 1) * rows / a.h));
            for (int px = 0; px < a.w; px++) {
                const int c0 = int(int64_t(px) * cols / a.w), c1 = std::max(c0 + 1, int(int64_t(px + 1) * cols / a.w));
                double sum = 0;
                int n = 0;
                for (int r = r0; r < r1; r++)
                    for (int c = c0; c < c1; c++)
                        if (!std::isnan(at(r, c))) sum += at(r, c), n++;
                cv.set(a.x + px, a.y + py, color(n ? sum / n : NAN, L.lo, L.hi));
            }
        }
        if (annotate) draw_values(cv, L);
        cv.stroke_rect({a.x - 1, a.y - 1, a.w + 2, a.h + 2}, INK);

        const int tick = 6;
        for (size_t k = 0; k < L.row_at.size(); k++) {
            const double cy = a.y + (L.row_at[k] + 0.5) * a.h / rows;
            cv.fill_rect(a.x - 1 - tick, int(cy), a.x - 1, int(cy) + 1, INK);
            cv.text(a.x - 1 - tick - 8, cy, L.row_text[k], INK, Align::End, Align::Center);
        }
        for (size_t k = 0; k < L.col_at.size(); k++) {
            const double cx = a.x + (L.col_at[k] + 0.5) * a.w / cols;
            cv.fill_rect(int(cx), a.y + a.h + 1, int(cx) + 1, a.y + a.h + 1 + tick, INK);
            cv.text(cx, a.y + a.h + tick + 8, L.col_text[k], INK, Align::Center);
        }
        // colorbar: top = hi, bottom = lo
        const Rect& b = L.bar;
        for (int y = 0; y < b.h; y++) {
            const double t = b.h > 1 ? 1.0 - double(y) / (b.h - 1) : 0.5;
            cv.fill_rect(b.x, b.y + y, b.x + b.w, b.y + y + 1, L.hi > L.lo ? colormap(t) : colormap(0.5));
        }
        cv.stroke_rect({b.x - 1, b.y - 1, b.w + 2, b.h + 2}, INK);
        for (size_t k = 0; k < L.bar_at.size(); k++) {
            const int y = b.y + b.h - 1 - int(std::lround(bar_frac(L, L.bar_at[k]) * (b.h - 1)));
            cv.fill_rect(b.x + b.w + 1, y, b.x + b.w + 1 + tick, y + 1, INK);
            cv.text(b.x + b.w + tick + 8, y + 0.5, L.bar_text[k], INK, Align::Start, Align::Center);
        }
        int row_w = 0;
        for (const auto& t : L.row_text) row_w = std::max(row_w, Canvas::text_width(t));
        detail::draw_labels(cv, a, title, xlabel, ylabel, row_w);
        return cv;
    }
    void save_png(const std::string& path) const { render().save_png(path); }

  private:
    static double bar_frac(const Layout& L, double v) { return L.hi > L.lo ? (v - L.lo) / (L.hi - L.lo) : 0.5; }
    // The colour range's ends (3 significant digits) and the nice ticks between that keep clear of them.
    static void colorbar_labels(Layout& L, int bar_h) {
        L.bar_at = {L.lo}, L.bar_text = {format_short(L.lo)};
        if (!(L.hi > L.lo)) return;
        const std::vector<double> ticks = nice_ticks(L.lo, L.hi, 5);
        const double step = ticks.size() >= 2 ? ticks[1] - ticks[0] : L.hi - L.lo;
        const double clear = double(TEXT_H + 6) / std::max(bar_h - 1, 1);  // label height as a fraction
        for (double t : ticks) {
            const double f = bar_frac(L, t);
            if (f < clear || f > 1 - clear) continue;
            L.bar_at.push_back(t), L.bar_text.push_back(format_tick(t, step));
        }
        L.bar_at.push_back(L.hi), L.bar_text.push_back(format_short(L.hi));
    }

    // Each cell's value printed in its centre, black or white for contrast, when the cells are big enough.
    void draw_values(Canvas& cv, const Layout& L) const {
        const double cw = double(L.area.w) / cols, ch = double(L.area.h) / rows;
        char buf[64];
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < cols; c++) {
                const double v = at(r, c);
                if (std::isnan(v)) continue;
                std::snprintf(buf, sizeof buf, value_format.c_str(), v);
                const int scale = Canvas::text_width(buf) + 6 <= cw && TEXT_H + 4 <= ch ? TEXT_SCALE : 1;
                if (Canvas::text_width(buf, scale) + 4 > cw || 7 * scale + 2 > ch) continue;
                const Rgb ink = luminance(color(v, L.lo, L.hi)) < 0.45 ? WHITE : BLACK;
                cv.text(L.area.x + (c + 0.5) * cw, L.area.y + (r + 0.5) * ch, buf, ink, Align::Center, Align::Center,
                        scale);
            }
    }
};

// ---------------------------------------------------------------- bar chart

struct BarChart {
    std::string title, xlabel, ylabel;
    int width = 640, height = 420;
    bool value_labels = true;  // the value above (or below, when negative) each bar
    std::vector<std::string> names;
    std::vector<double> values;

    void add(const std::string& name, double value) {
        HL_CHECK(std::isfinite(value), "BarChart: bar '", name, "' has the non-finite value ", value);
        names.push_back(name), values.push_back(value);
    }

    Axis axis() const {
        HL_CHECK(!values.empty(), "BarChart '", title, "': no bars");
        double lo = 0, hi = 0;  // bars grow from zero
        for (double v : values) lo = std::min(lo, v), hi = std::max(hi, v);
        if (lo == hi) hi = 1;
        const double m = 0.1 * (hi - lo);  // room for value labels
        return Axis::make(lo, hi, false, lo < 0 ? lo - m : 0.0, hi > 0 ? hi + m : 0.0);
    }
    Rect plot_area() const {
        const Axis ay = axis();
        return detail::plot_area(width, height, title, xlabel, ylabel, detail::max_label_width(ay), 0);
    }

    Canvas render() const {
        const Axis ay = axis();
        const Rect area = plot_area();
        Canvas cv(width, height);
        detail::draw_grid(cv, area, nullptr, ay);
        auto py = [&](double y) { return area.y + area.h - 0.5 - ay.frac(y) * (area.h - 1); };
        const int n = int(values.size());
        const double slot = double(area.w) / n, bar = std::max(1.0, 0.7 * slot);
        int label_w = 0;
        for (double v : values) label_w = std::max(label_w, Canvas::text_width(format_tick(v, ay.step / 10)));
        const bool show_values = value_labels && label_w + 2 <= slot;
        for (int i = 0; i < n; i++) {
            const double cx = area.x + (i + 0.5) * slot, y0 = py(0), y1 = py(values[i]);
            cv.fill_rect(int(std::lround(cx - bar / 2)), int(std::lround(std::min(y0, y1))),
                         int(std::lround(cx + bar / 2)), int(std::lround(std::max(y0, y1))) + 1, palette(i));
            if (show_values) {
                const bool neg = values[i] < 0;
                cv.text(cx, neg ? y1 + 6 : y1 - 6, format_tick(values[i], ay.step / 10), INK, Align::Center,
                        neg ? Align::Start : Align::End);
            }
            // names under the bars, at the small size when the big one does not fit the slot
            const int scale = Canvas::text_width(names[i]) + 4 <= slot ? TEXT_SCALE : 1;
            cv.text(cx, area.y + area.h + 6 + 8, names[i], INK, Align::Center, Align::Start, scale);
        }
        cv.fill_rect(area.x, int(py(0)), area.x + area.w, int(py(0)) + 1, INK);  // the zero line
        cv.stroke_rect({area.x - 1, area.y - 1, area.w + 2, area.h + 2}, INK);
        detail::draw_labels(cv, area, title, xlabel, ylabel, detail::max_label_width(ay));
        return cv;
    }
    void save_png(const std::string& path) const { render().save_png(path); }
};

}  // namespace hl::plot
