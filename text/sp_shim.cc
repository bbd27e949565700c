// sp_shim.cc: the extern "C" tokenizer API of text/tokenizer.h over libsentencepiece.
//
// The only C++ in tspeft. Every exported function catches everything (std::bad_alloc included) and
// turns it into a tk_err line naming the model file: no exception crosses into C. Nothing of
// sentencepiece's algorithm is reproduced here; the shim converts types, checks ranges and the
// model file's framing, and reports errors.
#include "tokenizer.h"

#include <sentencepiece_processor.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <string>
#include <vector>

struct tk_tokenizer {
    sentencepiece::SentencePieceProcessor sp;
    std::string path;
    int32_t vocab = 0;
    int32_t bos = -1, eos = -1, pad = -1, unk = -1;
};

namespace {

// Sentencepiece status text on one line (messages are printed as one error line).
std::string one_line(std::string s) {
    for (char &c : s)
        if (c == '\n' || c == '\r') c = ' ';
    while (!s.empty() && s.back() == ' ') s.pop_back();
    return s;
}

int fail_exception(tk_err *err, const char *path, const char *what, const std::exception *e) {
    return tk_fail(err, "%s: %s: %s", path ? path : "(tokenizer)", what,
                   e ? e->what() : "unknown C++ exception");
}

// Reads a protobuf base-128 varint at b[*i], n bytes in all; -1 when it runs past the end or is
// longer than 10 bytes.
int read_varint(const unsigned char *b, size_t n, size_t *i, uint64_t *out) {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (*i >= n) return -1;
        unsigned char c = b[(*i)++];
        v |= (uint64_t)(c & 0x7f) << shift;
        if (!(c & 0x80)) {
            *out = v;
            return 0;
        }
    }
    return -1;
}

// Checks the framing of a serialized ModelProto: a sequence of complete top-level fields, with
// pieces (1), trainer_spec (2) and normalizer_spec (3) present as length-delimited fields. A file
// cut at a field boundary parses as a valid (smaller) protobuf, which sentencepiece may load as a
// different model; this refuses it. Returns 0, or -1 with err naming the byte offset.
int check_model_framing(const unsigned char *b, size_t n, const char *path, tk_err *err) {
    if (n == 0) return tk_fail(err, "%s: not a sentencepiece model: the file is empty", path);
    size_t i = 0, n_pieces = 0;
    int have_trainer = 0, have_normalizer = 0;
    while (i < n) {
        size_t at = i;
        uint64_t key, len;
        if (read_varint(b, n, &i, &key) != 0)
            return tk_fail(err, "%s: not a sentencepiece model: truncated or corrupt at byte %zu (bad field key)",
                           path, at);
        uint64_t field = key >> 3;
        unsigned wire = (unsigned)(key & 7);
        if (field == 0)
            return tk_fail(err, "%s: not a sentencepiece model: corrupt at byte %zu (field number 0)", path, at);
        switch (wire) {
        case 0:
            if (read_varint(b, n, &i, &len) != 0)
                return tk_fail(err, "%s: not a sentencepiece model: truncated or corrupt at byte %zu (bad varint)",
                               path, at);
            break;
        case 1:
        case 5: {
            size_t w = wire == 1 ? 8 : 4;
            if (n - i < w)
                return tk_fail(err, "%s: not a sentencepiece model: truncated at byte %zu (fixed-size field %llu)",
                               path, at, (unsigned long long)field);
            i += w;
            break;
        }
        case 2:
            if (read_varint(b, n, &i, &len) != 0)
                return tk_fail(err, "%s: not a sentencepiece model: truncated or corrupt at byte %zu (bad length)",
                               path, at);
            if (len > n - i)
                return tk_fail(err,
                               "%s: not a sentencepiece model: truncated or corrupt at byte %zu (field %llu of %llu "
                               "bytes runs past the end of the %zu-byte file)",
                               path, at, (unsigned long long)field, (unsigned long long)len, n);
            i += (size_t)len;
            if (field == 1) n_pieces++;
            if (field == 2) have_trainer = 1;
            if (field == 3) have_normalizer = 1;
            break;
        default:
            return tk_fail(err, "%s: not a sentencepiece model: corrupt at byte %zu (wire type %u)", path, at, wire);
        }
        if (wire != 2 && field >= 1 && field <= 3)
            return tk_fail(err, "%s: not a sentencepiece model: corrupt at byte %zu (field %llu is not a message)",
                           path, at, (unsigned long long)field);
    }
    if (n_pieces == 0) return tk_fail(err, "%s: not a sentencepiece model: no pieces", path);
    if (!have_trainer || !have_normalizer)
        return tk_fail(err, "%s: not a sentencepiece model: truncated (%zu pieces, then no %s after byte %zu)", path,
                       n_pieces, have_trainer ? "normalizer_spec" : "trainer_spec", n);
    return 0;
}

// The length-delimited payloads of top-level field `want` of a protobuf message (the last one wins, as
// protobuf merges). 0 when found (b, n set), 1 when absent, -1 on broken framing.
int find_bytes_field(const unsigned char *m, size_t n, uint64_t want, const unsigned char **b, size_t *bn) {
    size_t i = 0;
    int found = 1;
    while (i < n) {
        uint64_t key, len;
        if (read_varint(m, n, &i, &key) != 0) return -1;
        unsigned wire = (unsigned)(key & 7);
        if (wire == 0) {
            if (read_varint(m, n, &i, &len) != 0) return -1;
        } else if (wire == 1 || wire == 5) {
            size_t w = wire == 1 ? 8 : 4;
            if (n - i < w) return -1;
            i += w;
        } else if (wire == 2) {
            if (read_varint(m, n, &i, &len) != 0 || len > n - i) return -1;
            if ((key >> 3) == want) {
                *b = m + i;
                *bn = (size_t)len;
                found = 0;
            }
            i += (size_t)len;
        } else {
            return -1;
        }
    }
    return found;
}

// A precompiled normalization table (NormalizerSpec.precompiled_charsmap): a little-endian uint32 trie
// size, a darts-clone double array of that many bytes, then the NUL-separated replacement strings.
// sentencepiece walks the trie without bounds checks (commonPrefixSearch: from unit 0, for each byte c
// it reads unit[base ^ c] with base = u ^ offset(unit[u]), accepts it when its label is c, and on a
// leaf reads the value at unit[v ^ offset(unit[v])] as an offset into the strings). Every unit index
// any input can reach must be inside the array and every leaf value inside the strings, NUL-terminated.
// 0 when so (or the table is empty), else -1 with err.
int check_charsmap(const unsigned char *b, size_t n, const char *path, const char *which, tk_err *err) {
    if (n == 0) return 0;
    if (n < 4) return tk_fail(err, "%s: corrupt sentencepiece model: %s normalization table of %zu bytes", path, which, n);
    size_t trie = (size_t)b[0] | (size_t)b[1] << 8 | (size_t)b[2] << 16 | (size_t)b[3] << 24;
    if (trie % 4 || trie == 0 || trie > n - 4)
        return tk_fail(err, "%s: corrupt sentencepiece model: %s normalization trie of %zu bytes in a %zu-byte table",
                       path, which, trie, n);
    size_t nu = trie / 4, ns = n - 4 - trie;
    const unsigned char *ub = b + 4, *strs = b + 4 + trie;
    auto unit = [&](size_t k) -> uint32_t {
        return (uint32_t)ub[4 * k] | (uint32_t)ub[4 * k + 1] << 8 | (uint32_t)ub[4 * k + 2] << 16 |
               (uint32_t)ub[4 * k + 3] << 24;
    };
    auto offset = [](uint32_t u) -> size_t { return (size_t)((u >> 10) << ((u & (1u << 9)) >> 6)); };
    std::vector<unsigned char> seen(nu, 0);
    std::vector<size_t> todo(1, 0);
    seen[0] = 1;
    while (!todo.empty()) {
        size_t u = todo.back();
        todo.pop_back();
        size_t base = u ^ offset(unit(u));
        for (unsigned c = 0; c < 256; c++) {
            size_t v = base ^ c;
            if (v >= nu)
                return tk_fail(err, "%s: corrupt sentencepiece model: %s normalization trie leads outside its %zu units",
                               path, which, nu);
            uint32_t uv = unit(v);
            if ((uv & ((1u << 31) | 0xFFu)) != c || seen[v]) continue;
            seen[v] = 1;
            todo.push_back(v);
            if ((uv >> 8) & 1u) { // a leaf: its value is an offset into the replacement strings
                size_t leaf = v ^ offset(uv);
                if (leaf >= nu)
                    return tk_fail(err, "%s: corrupt sentencepiece model: %s normalization trie leads outside its %zu "
                                        "units", path, which, nu);
                size_t val = unit(leaf) & 0x7FFFFFFFu;
                if (val >= ns || !memchr(strs + val, 0, ns - val))
                    return tk_fail(err, "%s: corrupt sentencepiece model: %s normalization entry at %zu outside its "
                                        "%zu bytes of strings", path, which, val, ns);
            }
        }
    }
    return 0;
}

// The normalizer (field 3) and denormalizer (field 5) tables of a ModelProto.
int check_normalizers(const unsigned char *m, size_t n, const char *path, tk_err *err) {
    static const struct {
        uint64_t field;
        const char *which;
    } specs[] = {{3, "normalizer"}, {5, "denormalizer"}};
    for (const auto &sp : specs) {
        const unsigned char *spec, *map;
        size_t sn, mn;
        int r = find_bytes_field(m, n, sp.field, &spec, &sn);
        if (r < 0) return tk_fail(err, "%s: not a sentencepiece model: corrupt framing", path);
        if (r > 0) continue;
        r = find_bytes_field(spec, sn, 2, &map, &mn); // NormalizerSpec.precompiled_charsmap
        if (r < 0) return tk_fail(err, "%s: corrupt sentencepiece model: %s spec framing", path, sp.which);
        if (r == 0 && check_charsmap(map, mn, path, sp.which, err) != 0) return -1;
    }
    return 0;
}

// libsentencepiece trusts the model's precompiled normalizer (a darts-clone trie it walks without bounds
// checks): a corrupt one loads fine and then crashes the first encode (found by the tokenizer fuzz
// target). A model from outside is therefore encoded once in a forked child first; a child killed
// by a signal means the model would crash us, and it is refused. Returns 0 when the probe ran cleanly.
int probe_in_child(sentencepiece::SentencePieceProcessor &sp, const char *path, tk_err *err) {
    static const char probe[] = "Hello, world! 123  tabs\tand\nnewlines \xc3\xa9\xc3\xbc\xe4\xb8\xad\xe6\x96\x87 "
                                "\xf0\x9f\x98\x80 \xef\xbc\xa1\xe2\x85\xa0 A\xcc\x8a ~!@#$%^&*() ";
    fflush(nullptr);
    pid_t pid = fork();
    if (pid < 0) return 0; // cannot probe (no process left): load as before
    if (pid == 0) {
        // the default action for crash signals: the kernel ends the child, the parent sees the signal
        // (no inherited handler, a sanitizer's or a fuzzer's, may report it as this process's crash)
        const int sigs[] = {SIGSEGV, SIGBUS, SIGABRT, SIGFPE, SIGILL};
        for (int sg : sigs) signal(sg, SIG_DFL);
        std::vector<int> ids;
        std::string back;
        sp.Encode(absl::string_view(probe, sizeof probe - 1), &ids).IgnoreError();
        sp.Decode(ids, &back).IgnoreError();
        _exit(0);
    }
    int status = 0;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR) return 0;
    if (WIFSIGNALED(status))
        return tk_fail(err, "%s: corrupt sentencepiece model: encoding with it crashes libsentencepiece (signal %d; "
                            "a damaged normalizer table?)", path, WTERMSIG(status));
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        return tk_fail(err, "%s: corrupt sentencepiece model: a test encode failed", path);
    return 0;
}

} // namespace

extern "C" {

tk_tokenizer *tk_tok_open(const char *path, tk_err *err) {
    if (!path) {
        tk_fail(err, "tokenizer: no model path given");
        return nullptr;
    }
    size_t len = 0;
    char *bytes = tk_read_file(path, &len, err); // "PATH: cannot open: ..." on failure
    if (!bytes) return nullptr;
    tk_tokenizer *tok = nullptr;
    try {
        if (check_model_framing(reinterpret_cast<const unsigned char *>(bytes), len, path, err) != 0 ||
            check_normalizers(reinterpret_cast<const unsigned char *>(bytes), len, path, err) != 0) {
            free(bytes);
            return nullptr;
        }
        tok = new tk_tokenizer();
        tok->path = path;
        sentencepiece::util::Status st = tok->sp.LoadFromSerializedProto(absl::string_view(bytes, len));
        free(bytes);
        bytes = nullptr;
        if (!st.ok()) {
            tk_fail(err, "%s: cannot load sentencepiece model: %s", path, one_line(st.ToString()).c_str());
            delete tok;
            return nullptr;
        }
        int size = tok->sp.GetPieceSize();
        if (size <= 0) {
            tk_fail(err, "%s: cannot load sentencepiece model: it has no pieces", path);
            delete tok;
            return nullptr;
        }
        if (probe_in_child(tok->sp, path, err) != 0) {
            delete tok;
            return nullptr;
        }
        tok->vocab = size;
        tok->bos = tok->sp.bos_id();
        tok->eos = tok->sp.eos_id();
        tok->pad = tok->sp.pad_id();
        tok->unk = tok->sp.unk_id();
        // Sentencepiece reports -1 for an undefined special; anything else must be a valid id.
        const int32_t specials[4] = {tok->bos, tok->eos, tok->pad, tok->unk};
        for (int32_t s : specials) {
            if (s < -1 || s >= size) {
                tk_fail(err, "%s: cannot load sentencepiece model: special id %d outside [0, %d)", path, (int)s, size);
                delete tok;
                return nullptr;
            }
        }
        return tok;
    } catch (const std::exception &e) {
        fail_exception(err, path, "cannot load sentencepiece model", &e);
    } catch (...) {
        fail_exception(err, path, "cannot load sentencepiece model", nullptr);
    }
    free(bytes);
    delete tok;
    return nullptr;
}

void tk_tok_free(tk_tokenizer *tok) {
    try {
        delete tok;
    } catch (...) {
    }
}

const char *tk_tok_path(const tk_tokenizer *tok) { return tok ? tok->path.c_str() : "(no tokenizer)"; }

int32_t tk_tok_vocab_size(const tk_tokenizer *tok) { return tok ? tok->vocab : 0; }
int32_t tk_tok_bos_id(const tk_tokenizer *tok) { return tok ? tok->bos : -1; }
int32_t tk_tok_eos_id(const tk_tokenizer *tok) { return tok ? tok->eos : -1; }
int32_t tk_tok_pad_id(const tk_tokenizer *tok) { return tok ? tok->pad : -1; }
int32_t tk_tok_unk_id(const tk_tokenizer *tok) { return tok ? tok->unk : -1; }

int32_t tk_tok_piece_to_id(const tk_tokenizer *tok, const char *piece, size_t len) {
    if (!tok || (!piece && len)) return -1;
    try {
        return tok->sp.PieceToId(absl::string_view(piece ? piece : "", len));
    } catch (...) {
        return -1;
    }
}

const char *tk_tok_id_to_piece(const tk_tokenizer *tok, int32_t id) {
    if (!tok || id < 0 || id >= tok->vocab) return nullptr;
    try {
        return tok->sp.IdToPiece(id).c_str();
    } catch (...) {
        return nullptr;
    }
}

int tk_tok_is_control(const tk_tokenizer *tok, int32_t id) {
    if (!tok || id < 0 || id >= tok->vocab) return 0;
    try {
        return tok->sp.IsControl(id) ? 1 : 0;
    } catch (...) {
        return 0;
    }
}

int tk_tok_encode(const tk_tokenizer *tok, const char *text, size_t len, int add_bos, int add_eos, tk_ids *out,
                  tk_err *err) {
    if (!tok || !out) return tk_fail(err, "tokenizer: encode called without a tokenizer or an output buffer");
    if (!text && len) return tk_fail(err, "%s: encode: NULL text of %zu bytes", tok->path.c_str(), len);
    if (len > (size_t)INT32_MAX)
        return tk_fail(err, "%s: encode: text of %zu bytes is longer than the 2 GiB sentencepiece takes",
                       tok->path.c_str(), len);
    if (add_bos && tok->bos < 0) return tk_fail(err, "%s: encode: the model has no BOS piece", tok->path.c_str());
    if (add_eos && tok->eos < 0) return tk_fail(err, "%s: encode: the model has no EOS piece", tok->path.c_str());
    try {
        sentencepiece::ImmutableSentencePieceText spt;
        sentencepiece::util::Status st = tok->sp.Encode(absl::string_view(text ? text : "", len), spt.mutable_proto());
        if (!st.ok())
            return tk_fail(err, "%s: cannot encode %zu bytes of text: %s", tok->path.c_str(), len,
                           one_line(st.ToString()).c_str());
        size_t np = spt.pieces_size();
        if (tk_ids_reserve(out, np + (add_bos ? 1 : 0) + (add_eos ? 1 : 0), err) != 0) return -1;
        size_t k = out->n;
        if (add_bos) {
            out->ids[k] = tok->bos;
            out->begin[k] = out->end[k] = 0;
            k++;
        }
        for (size_t i = 0; i < np; i++) {
            const auto piece = spt.pieces((int)i);
            uint32_t id = piece.id(), b = piece.begin(), e = piece.end();
            if (id >= (uint32_t)tok->vocab || b > e || e > len)
                return tk_fail(err, "%s: encode: sentencepiece returned id %u at bytes [%u, %u) of a %zu-byte text",
                               tok->path.c_str(), id, b, e, len);
            out->ids[k] = (int32_t)id;
            out->begin[k] = b;
            out->end[k] = e;
            k++;
        }
        if (add_eos) {
            out->ids[k] = tok->eos;
            out->begin[k] = out->end[k] = (uint32_t)len;
            k++;
        }
        out->n = k;
        return 0;
    } catch (const std::exception &e) {
        return fail_exception(err, tok->path.c_str(), "encode", &e);
    } catch (...) {
        return fail_exception(err, tok->path.c_str(), "encode", nullptr);
    }
}

char *tk_tok_decode(const tk_tokenizer *tok, const int32_t *ids, size_t n, size_t *len_out, tk_err *err) {
    if (!tok) {
        tk_fail(err, "tokenizer: decode called without a tokenizer");
        return nullptr;
    }
    if (!ids && n) {
        tk_fail(err, "%s: decode: NULL ids for %zu tokens", tok->path.c_str(), n);
        return nullptr;
    }
    try {
        std::vector<int> v(n);
        for (size_t i = 0; i < n; i++) {
            if (ids[i] < 0 || ids[i] >= tok->vocab) {
                tk_fail(err, "%s: decode: id %d at position %zu is outside the vocabulary [0, %d)", tok->path.c_str(),
                        (int)ids[i], i, (int)tok->vocab);
                return nullptr;
            }
            v[i] = ids[i];
        }
        std::string text;
        sentencepiece::util::Status st = tok->sp.Decode(v, &text);
        if (!st.ok()) {
            tk_fail(err, "%s: cannot decode %zu ids: %s", tok->path.c_str(), n, one_line(st.ToString()).c_str());
            return nullptr;
        }
        char *out = static_cast<char *>(malloc(text.size() + 1));
        if (!out) {
            tk_fail(err, "%s: decode: out of memory for %zu bytes", tok->path.c_str(), text.size() + 1);
            return nullptr;
        }
        memcpy(out, text.data(), text.size());
        out[text.size()] = '\0';
        if (len_out) *len_out = text.size();
        return out;
    } catch (const std::exception &e) {
        fail_exception(err, tok->path.c_str(), "decode", &e);
    } catch (...) {
        fail_exception(err, tok->path.c_str(), "decode", nullptr);
    }
    return nullptr;
}

} // extern "C"
