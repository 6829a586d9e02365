// tokenizer.h — the default tokenizer: one token per byte (vocab 256). Nothing to train or ship,
// every file is encodable, and decoding gives back the exact bytes (UTF-8 text stays UTF-8).
#pragma once
#include <string>          // std::string
#include <vector>          // std::vector
#include "model/common.h"  // HL_CHECK

namespace hl {

struct ByteTokenizer {
    static constexpr int vocab_size = 256;

    // text → token ids: byte b becomes id b (0..255; bytes ≥ 128 included, read as unsigned).
    std::vector<int> encode(const std::string& text) const {
        std::vector<int> ids(text.size());
        for (size_t i = 0; i < text.size(); i++) ids[i] = int((unsigned char)text[i]);
        return ids;
    }

    // token ids → text, byte for byte. An id outside 0..255 cannot come from this tokenizer: error.
    std::string decode(const std::vector<int>& ids) const {
        std::string text(ids.size(), '\0');
        for (size_t i = 0; i < ids.size(); i++) {
            HL_CHECK(ids[i] >= 0 && ids[i] < vocab_size, "tokenizer: token ", ids[i], " at position ", i,
                     " is outside the byte vocabulary 0..", vocab_size - 1);
            text[i] = char((unsigned char)ids[i]);
        }
        return text;
    }

    // One token → its byte, e.g. for printing samples token by token as they are generated.
    std::string decode_token(int id) const {
        HL_CHECK(id >= 0 && id < vocab_size, "tokenizer: token ", id, " is outside the byte vocabulary 0..",
                 vocab_size - 1);
        return std::string(1, char((unsigned char)id));
    }
};

}  // namespace hl
