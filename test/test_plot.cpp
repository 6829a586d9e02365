// test_plot.cpp — the PNG plotting library (dev/study/plot.h): nice and log ticks, tick labels, the
// colormap, and every chart rendered to a PNG, read back and checked (size, colours, a NaN gap, the
// heatmap's corner colours); bad data and unwritable paths are clear errors.
// HL_PLOT_EXAMPLES=<dir> also writes each chart there to look at.
#include <algorithm>          // std::max
#include <cmath>              // std::exp, std::sin, NAN
#include <cstdlib>            // std::getenv
#include <set>                // std::set
#include <string>             // std::string
#include <vector>             // std::vector
#include <doctest/doctest.h>  // TEST_CASE, CHECK
#include "dev/study/plot.h"   // Canvas, LineChart, Heatmap, BarChart, nice_ticks, log_ticks, format_tick, colormap
#include "model/common.h"     // hl::Error
#include "test/files.h"       // TempDir

// stb_image decodes the PNGs back (test only); its own code's warnings are not ours
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wunused-function"
#define STB_IMAGE_STATIC
#define STB_IMAGE_IMPLEMENTATION
#include <stb/stb_image.h>  // stbi_load, stbi_image_free
#pragma GCC diagnostic pop

using namespace hl;
using namespace hl::plot;
using hl::test::TempDir;

namespace {

// A PNG read back from disk as RGB.
struct Image {
    int w = 0, h = 0, channels = 0;
    std::vector<unsigned char> px;
    Rgb at(int x, int y) const {
        const unsigned char* p = &px[(size_t(y) * w + x) * 3];
        return {p[0], p[1], p[2]};
    }
    bool has(Rgb c) const {
        for (size_t i = 0; i < px.size(); i += 3)
            if (px[i] == c.r && px[i + 1] == c.g && px[i + 2] == c.b) return true;
        return false;
    }
    size_t n_colors(size_t enough = 64) const {  // distinct colours, counted up to `enough`
        std::set<int> s;
        for (size_t i = 0; i < px.size() && s.size() < enough; i += 3) s.insert(px[i] << 16 | px[i + 1] << 8 | px[i + 2]);
        return s.size();
    }
};

Image load(const std::string& path) {
    Image im;
    unsigned char* data = stbi_load(path.c_str(), &im.w, &im.h, &im.channels, 3);
    REQUIRE_MESSAGE(data != nullptr, "could not read back ", path);
    im.px.assign(data, data + size_t(im.w) * im.h * 3);
    stbi_image_free(data);
    return im;
}

// Saves to the temp dir and reads back; with HL_PLOT_EXAMPLES set, also keeps a copy there.
template <typename Chart>
Image save_and_load(const Chart& chart, const TempDir& dir, const std::string& name) {
    chart.save_png(dir.file(name));
    if (const char* keep = std::getenv("HL_PLOT_EXAMPLES")) chart.save_png(std::string(keep) + "/" + name);
    return load(dir.file(name));
}

}  // namespace

TEST_CASE("plot: nice ticks, log ticks and tick labels") {
    auto near = [](const std::vector<double>& got, const std::vector<double>& want) {
        REQUIRE(got.size() == want.size());
        for (size_t i = 0; i < got.size(); i++) CHECK(got[i] == doctest::Approx(want[i]).epsilon(1e-12));
    };
    near(nice_ticks(0, 1), {0, 0.2, 0.4, 0.6, 0.8, 1.0});
    near(nice_ticks(0, 100), {0, 20, 40, 60, 80, 100});
    near(nice_ticks(-3.7, 12.2), {-2, 0, 2, 4, 6, 8, 10, 12});  // step 2 (8 ticks) beats step 5 (3 ticks)
    near(nice_ticks(0.0013, 0.0071, 4), {0.002, 0.004, 0.006});
    near(nice_ticks(1.43, 1.47, 5), {1.43, 1.44, 1.45, 1.46, 1.47});
    near(nice_ticks(5, 5), {5});
    CHECK_THROWS_AS(nice_ticks(2, 1), hl::Error);
    CHECK_THROWS_AS(nice_ticks(0, NAN), hl::Error);

    near(log_ticks(1, 1e4), {1, 10, 100, 1e3, 1e4});
    near(log_ticks(0.3, 4), {0.5, 1, 2});                // one decade: 1-2-5 steps
    near(log_ticks(1.05, 7.5), {2, 3, 4, 5, 6, 7});      // 1-2-5 gives only two: every digit
    near(log_ticks(3.1, 3.9, 5), {3.2, 3.4, 3.6, 3.8});  // within a decade: linear nice ticks
    const auto wide = log_ticks(1e-8, 1e8);              // 17 decades thinned to every 3rd
    CHECK(wide.size() <= 7);
    CHECK(wide.front() == doctest::Approx(1e-8));
    CHECK(wide[1] == doctest::Approx(1e-5));
    CHECK_THROWS_AS(log_ticks(0, 10), hl::Error);

    CHECK(format_tick(0.6000000000000001, 0.2) == "0.6");
    CHECK(format_tick(0.05, 0.05) == "0.05");
    CHECK(format_tick(-1e-17, 0.2) == "0");  // rounding noise, not "-0.0"
    CHECK(format_tick(0, 0.2) == "0");
    CHECK(format_tick(1200, 200) == "1200");
    CHECK(format_tick(-5, 5) == "-5");
    CHECK(format_tick(2.5e6, 5e5) == "2.5e6");
    CHECK(format_tick(3e6, 5e5) == "3e6");
    CHECK(format_tick(1e-4, 1e-4) == "1e-4");
    CHECK(format_tick(3e-4, 1e-4) == "3e-4");
    CHECK(format_short(0.0067341) == "0.00673");
    CHECK(format_short(12345.0) == "1.23e4");
}

TEST_CASE("plot: colormap runs dark purple to yellow with rising luminance") {
    CHECK(colormap(0) == Rgb{0x44, 0x01, 0x54});  // viridis' ends
    CHECK(colormap(1) == Rgb{0xfd, 0xe7, 0x25});
    CHECK(colormap(-3) == colormap(0));  // clamped
    CHECK(colormap(7) == colormap(1));
    double prev = -1;
    for (int i = 0; i <= 100; i++) {
        const double l = luminance(colormap(i / 100.0));
        CHECK(l >= prev - 1e-3);
        prev = l;
    }
    CHECK(luminance(colormap(0.5)) > luminance(colormap(0)) + 0.2);
}

TEST_CASE("plot: canvas draws lines, rects and text, clips, and saves a PNG") {
    Canvas cv(60, 40);
    CHECK(cv.get(0, 0) == WHITE);
    cv.fill_rect(2, 3, 5, 6, BLACK);  // pixels 2..4 × 3..5
    CHECK(cv.get(2, 3) == BLACK);
    CHECK(cv.get(4, 5) == BLACK);
    CHECK(cv.get(5, 5) == WHITE);
    CHECK(cv.get(4, 6) == WHITE);
    const Rgb red{220, 20, 20};
    cv.line(10, 20.5, 50, 20.5, red, 3);  // horizontal, 3 px thick: rows 19, 20, 21 fully covered
    CHECK(cv.get(30, 19) == red);
    CHECK(cv.get(30, 21) == red);
    CHECK(cv.get(30, 22) == WHITE);
    CHECK(cv.get(9, 20) == red);   // round caps reach 1.5 px past the ends
    CHECK(cv.get(7, 20) == WHITE);
    cv.line(20.5, 0, 20.5, 40, red, 1);  // vertical, 1 px: one column
    CHECK(cv.get(20, 10) == red);
    CHECK(cv.get(19, 10) == WHITE);
    CHECK(cv.get(21, 10) == WHITE);
    cv.blend(40, 5, BLACK, 0.5);
    CHECK(cv.get(40, 5) == Rgb{128, 128, 128});

    cv.clip = {0, 0, 30, 40};
    cv.fill_rect(25, 30, 40, 35, BLACK);  // only x < 30 lands
    CHECK(cv.get(29, 32) == BLACK);
    CHECK(cv.get(30, 32) == WHITE);
    cv.reset_clip();

    CHECK(Canvas::text_width("") == 0);
    CHECK(Canvas::text_width("AB") > Canvas::text_width("A"));
    CHECK(Canvas::text_height("x") == TEXT_H);
    Canvas t(80, 30);
    t.text(2, 2, "Hi 42", BLACK);
    int ink = 0, right = 0;
    for (int y = 0; y < 30; y++)
        for (int x = 0; x < 80; x++)
            if (t.get(x, y) == BLACK) ink++, right = std::max(right, x);
    CHECK(ink > 40);
    CHECK(right == doctest::Approx(2 + Canvas::text_width("Hi 42") - 1).epsilon(0.05));
    t.text(70, 2, "\xff\x01", BLACK);  // non-ASCII is drawn as '?', not read out of bounds

    TempDir dir;
    cv.save_png(dir.file("canvas.png"));
    const Image im = load(dir.file("canvas.png"));
    CHECK(im.w == 60);
    CHECK(im.h == 40);
    CHECK(im.channels == 3);
    CHECK(im.at(30, 20) == red);
    CHECK(im.at(3, 4) == BLACK);
}

TEST_CASE("plot: line chart renders series in distinct colours, with a legend and NaN gaps") {
    LineChart c;
    c.title = "Training loss";
    c.xlabel = "step";
    c.ylabel = "loss";
    std::vector<double> steps, a, b;
    for (int i = 0; i <= 50; i++) {
        steps.push_back(40.0 * i);
        a.push_back(4.0 * std::exp(-i / 8.0) + 1.5 + 0.05 * std::sin(i));
        b.push_back(i >= 20 && i < 26 ? NAN : 4.0 * std::exp(-i / 12.0) + 1.6);  // a gap of missing evals
    }
    c.add("hybrid", steps, a);
    c.add("attention", steps, b).markers = true;
    c.add("flat", {0, 2000}, {3, 3});
    CHECK(c.series[0].color != c.series[1].color);
    CHECK(c.series[1].color != c.series[2].color);

    TempDir dir;
    const Image im = save_and_load(c, dir, "line.png");
    CHECK(im.w == c.width);
    CHECK(im.h == c.height);
    CHECK(im.channels == 3);
    CHECK(im.n_colors() > 20);  // not one colour: lines, anti-aliasing, text
    for (const Series& s : c.series) CHECK(im.has(s.color));
    CHECK(im.has(INK));  // axes and labels

    // a known geometry: y = 0 from x = 0 to 4 with x = 2 missing, on fixed ranges
    LineChart g;
    g.width = 400, g.height = 300;
    g.x_min = 0, g.x_max = 4, g.y_min = -1, g.y_max = 1;
    g.legend = false;
    g.add("", {0, 1, 2, 3, 4}, {0, 0, NAN, 0, 0});
    const Rect area = g.plot_area();
    const Image gi = save_and_load(g, dir, "gap.png");
    const Rgb col = g.series[0].color;
    const int row = int(area.y + area.h / 2);  // y = 0 lies in the middle row
    auto px = [&](double x) { return int(area.x + 0.5 + x / 4 * (area.w - 1)); };
    CHECK(gi.at(px(0.5), row) == col);
    CHECK(gi.at(px(3.5), row) == col);
    for (double x = 1.25; x <= 2.75; x += 0.25) CHECK(gi.at(px(x), row) != col);  // broken around x = 2

    // a log-y chart with explicit x ticks renders too
    LineChart l;
    l.width = 400, l.height = 300;
    l.log_x = l.log_y = true;
    l.x_ticks = {256, 1024, 4096};
    l.add("attention", {256, 512, 1024, 2048, 4096}, {1.1, 1.5, 2.3, 3.9, 7.2}).markers = true;
    l.add("ssd", {256, 512, 1024, 2048, 4096}, {1.3, 1.3, 1.31, 1.3, 1.32});
    const Image li = save_and_load(l, dir, "line_log.png");
    CHECK(li.has(l.series[0].color));
    CHECK(li.has(l.series[1].color));
}

TEST_CASE("plot: line chart errors are clear") {
    LineChart c;
    c.log_x = true;
    c.add("a", {1, 0, 3}, {1, 2, 3});
    CHECK_THROWS_WITH_AS(c.render(), "LineChart: log-x axis needs positive x, but series 'a' has x[1] = 0", hl::Error);
    LineChart d;
    d.log_y = true;
    d.add("b", {1, 2, 3}, {1, NAN, -2});  // NaN is a gap, -2 is an error
    CHECK_THROWS_WITH_AS(d.render(), "LineChart: log-y axis needs positive y, but series 'b' has y[2] = -2", hl::Error);
    LineChart e;
    CHECK_THROWS_WITH_AS(e.add("c", {1, 2}, {1}), "LineChart: series 'c' has 2 x values but 1 y values", hl::Error);
    e.add("c", {1, 2}, {NAN, NAN});
    CHECK_THROWS_AS(e.render(), hl::Error);  // nothing finite to plot
}

TEST_CASE("plot: heatmap corners take the colormap's ends; NaN cells are grey; colorbar drawn") {
    const int R = 12, C = 16;
    std::vector<double> m(R * C);
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) m[r * C + c] = 0.1 + 0.5 * std::sin(0.3 * r + 0.2 * c) * std::sin(0.3 * r + 0.2 * c);
    m[0] = -1;                // min at the top-left
    m[R * C - 1] = 5;         // max at the bottom-right
    m[0 * C + C - 1] = NAN;   // a masked cell at the top-right
    Heatmap h(R, C, m);
    h.max_side = 240;
    h.title = "Attention (layer 0, head 0)";
    h.xlabel = "key";
    h.ylabel = "query";
    const Rect a = h.plot_area();
    CHECK(a.w == C * (h.max_side / C));  // square cells of whole pixels
    CHECK(a.h == R * (h.max_side / C));

    TempDir dir;
    const Image im = save_and_load(h, dir, "heatmap.png");
    CHECK(im.channels == 3);
    CHECK(im.n_colors() > 20);
    CHECK(im.at(a.x, a.y) == colormap(0));                      // min cell
    CHECK(im.at(a.x + a.w - 1, a.y + a.h - 1) == colormap(1));  // max cell
    CHECK(im.at(a.x + a.w - 1, a.y) == MISSING);                // NaN cell
    CHECK(im.at(a.x, a.y + a.h - 1) != colormap(0));            // an ordinary cell is in between

    // fixed colour range, labels, annotations (a NIAH grid)
    Heatmap n(3, 4, {1, 0.5, 0, 1, 1, 1, 0.25, 0, 1, 1, 1, NAN});
    n.max_side = 320;
    n.vmin = 0, n.vmax = 1;
    n.annotate = true;
    n.row_labels = {"0%", "50%", "100%"};
    n.col_labels = {"1k", "2k", "4k", "8k"};
    const Rect na = n.plot_area();
    const Image ni = save_and_load(n, dir, "niah.png");
    CHECK(ni.at(na.x + 1, na.y + 1) == colormap(1));  // a cell's corner, clear of its printed value
    CHECK(ni.at(na.x + na.w / 2 + 1, na.y + 1) == colormap(0));
    // values printed in black on the bright cell (0, 0), in white on the dark cell (0, 2)
    auto count = [&](int r, int c, Rgb col) {
        int k = 0;
        for (int y = na.y + r * na.h / 3; y < na.y + (r + 1) * na.h / 3; y++)
            for (int x = na.x + c * na.w / 4; x < na.x + (c + 1) * na.w / 4; x++) k += ni.at(x, y) == col;
        return k;
    };
    CHECK(count(0, 0, BLACK) > 30);
    CHECK(count(0, 2, WHITE) > 30);
    CHECK(count(0, 2, BLACK) == 0);

    // a matrix larger than the drawing area is averaged down
    Heatmap big(500, 300, std::vector<double>(150000, 2.0));
    big.max_side = 200;
    for (int c = 0; c < 300; c++) big.values[c] = 0;  // row 0 at 0, the rest at 2
    const Rect ba = big.plot_area();
    CHECK(ba.h == 200);
    CHECK(ba.w == 120);
    const Canvas bc = big.render();
    CHECK(bc.get(ba.x, ba.y) == colormap(0.5));  // 2.5 rows a pixel: rows 0 and 1 average to 1, halfway up 0..2
    CHECK(bc.get(ba.x, ba.y + 5) == colormap(1));

    Heatmap bad(2, 2, {1, 2, 3});
    CHECK_THROWS_WITH_AS(bad.render(), "Heatmap: 2x2 needs 4 values, got 3", hl::Error);
    Heatmap nan(1, 2, {1, NAN});
    nan.mask_nan = false;
    CHECK_THROWS_WITH_AS(nan.render(), "Heatmap: value (0, 1) is NaN (set mask_nan to draw NaN cells grey)", hl::Error);
}

TEST_CASE("plot: bar chart draws each bar in its colour") {
    BarChart b;
    b.title = "Parameters";
    b.ylabel = "millions";
    b.add("attention", 12.3);
    b.add("mamba2", 11.8);
    b.add("hybrid", -2.5);
    TempDir dir;
    const Image im = save_and_load(b, dir, "bar.png");
    CHECK(im.w == b.width);
    CHECK(im.h == b.height);
    for (int i = 0; i < 3; i++) CHECK(im.has(palette(i)));
    CHECK_THROWS_AS(b.add("inf", INFINITY), hl::Error);
    CHECK_THROWS_AS(BarChart().render(), hl::Error);
}

TEST_CASE("plot: an unwritable path is a clear error") {
    Canvas cv(4, 4);
    CHECK_THROWS_WITH_AS(cv.save_png("/nonexistent_hl_dir/x.png"),
                         doctest::Contains("plot: could not write PNG '/nonexistent_hl_dir/x.png'"), hl::Error);
    TempDir dir;
    CHECK_THROWS_AS(cv.save_png(dir.path), hl::Error);  // a directory
    cv.save_png(dir.file("ok.png"));
    CHECK(load(dir.file("ok.png")).w == 4);
    LineChart c;
    c.add("a", {1, 2}, {1, 2});
    CHECK_THROWS_AS(c.save_png("/nonexistent_hl_dir/line.png"), hl::Error);
}
