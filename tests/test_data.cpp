// Tests for src/data.c: sources (text file and directory, token file,
// synthetic), the per-category split, error messages, and the batch rule that
// makes a 1-rank run see exactly what P ranks see together.
#include <gtest/gtest.h>

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "moesim/data.h"

namespace fs = std::filesystem;

namespace {

const char *kFortunes = "/usr/share/games/fortunes";

Config base_config(const std::string &path, const char *format) {
    Config cfg;
    memset(&cfg, 0, sizeof cfg);
    snprintf(cfg.data_path, sizeof cfg.data_path, "%s", path.c_str());
    snprintf(cfg.data_format, sizeof cfg.data_format, "%s", format);
    cfg.val_fraction = 0.1;
    cfg.seed = 1234;
    cfg.synthetic_clusters = 4;
    cfg.synthetic_tokens = 64 * 1024;
    cfg.seq_length = 16;
    return cfg;
}

// A temporary file (mkstemp under /tmp) removed when the test ends.
struct TempFile {
    std::string path;
    explicit TempFile(const std::string &contents, const char *suffix = "") {
        std::string tmpl = std::string("/tmp/moesim_data_XXXXXX") + suffix;
        std::vector<char> buf(tmpl.begin(), tmpl.end());
        buf.push_back('\0');
        int fd = mkstemps(buf.data(), (int)strlen(suffix));
        EXPECT_GE(fd, 0);
        if (fd >= 0) {
            EXPECT_EQ(write(fd, contents.data(), contents.size()), (ssize_t)contents.size());
            close(fd);
        }
        path = buf.data();
    }
    ~TempFile() { unlink(path.c_str()); }
};

struct TempDir {
    std::string path;
    TempDir() {
        char buf[] = "/tmp/moesim_data_dir_XXXXXX";
        EXPECT_NE(mkdtemp(buf), nullptr);
        path = buf;
    }
    void add(const std::string &name, const std::string &contents) const {
        std::ofstream(path + "/" + name, std::ios::binary) << contents;
    }
    ~TempDir() { fs::remove_all(path); }
};

std::string file_bytes(const std::string &path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::vector<uint16_t> stream_tokens(const TokenStream &s) {
    return std::vector<uint16_t>(s.tokens, s.tokens + s.len);
}
std::vector<int32_t> stream_categories(const TokenStream &s) {
    return std::vector<int32_t>(s.categories, s.categories + s.len);
}

// Loads a config that must fail; returns the message.
std::string load_error(const Config &cfg) {
    Dataset ds;
    char err[MOESIM_ERR_MAX] = {0};
    int rc = dataset_load(&ds, &cfg, err, sizeof err);
    EXPECT_EQ(rc, -1) << "expected dataset_load to fail for " << cfg.data_path;
    dataset_free(&ds);
    EXPECT_NE(err[0], '\0');
    return err;
}

}  // namespace

// ------------------------------------------------------------------ text

TEST(DataText, FortunesDirectoryLoadsEveryTopicIntoBothSplits) {
    ASSERT_TRUE(fs::is_directory(kFortunes))
        << kFortunes << " is missing: apt-get install fortunes-min fortunes";
    std::vector<std::string> names;
    size_t total_bytes = 0;
    for (const auto &e : fs::directory_iterator(kFortunes)) {
        std::string name = e.path().filename();
        if (!e.is_regular_file() || e.is_symlink() || name[0] == '.') continue;
        if (name.size() >= 4 && name.compare(name.size() - 4, 4, ".dat") == 0) continue;
        if (e.file_size() == 0) continue;
        names.push_back(name);
        total_bytes += e.file_size();
    }
    std::sort(names.begin(), names.end());
    ASSERT_GT(names.size(), 1u);

    Config cfg = base_config(kFortunes, "auto");
    cfg.seq_length = 256;
    Dataset ds;
    char err[MOESIM_ERR_MAX] = {0};
    /* Speed is measured by benchmarks, not asserted here: a wall-clock bound
     * fails on a loaded machine (the sanitizer build took 118 ms). */
    ASSERT_EQ(dataset_load(&ds, &cfg, err, sizeof err), 0) << err;

    EXPECT_EQ(ds.vocab_size, 256);
    ASSERT_EQ(ds.num_categories, (int)names.size());
    for (int c = 0; c < ds.num_categories; c++)
        EXPECT_EQ(std::string(ds.category_names[c]), names[c]);
    EXPECT_EQ(ds.train.len + ds.val.len, total_bytes);

    std::vector<size_t> train_count(names.size()), val_count(names.size());
    for (size_t i = 0; i < ds.train.len; i++) train_count.at(ds.train.categories[i])++;
    for (size_t i = 0; i < ds.val.len; i++) val_count.at(ds.val.categories[i])++;
    for (size_t c = 0; c < names.size(); c++) {
        size_t bytes = fs::file_size(fs::path(kFortunes) / names[c]);
        EXPECT_GT(train_count[c], 0u) << names[c];
        EXPECT_GT(val_count[c], 0u) << names[c];
        EXPECT_EQ(train_count[c] + val_count[c], bytes) << names[c];
        EXPECT_EQ(val_count[c], (size_t)(bytes / 10)) << names[c];
    }
    // The validation stream starts with the tail of the first file.
    std::string first = file_bytes(std::string(kFortunes) + "/" + names[0]);
    std::string tail = first.substr(first.size() - val_count[0]);
    for (size_t i = 0; i < tail.size(); i++)
        ASSERT_EQ(ds.val.tokens[i], (unsigned char)tail[i]) << i;
    dataset_free(&ds);
}

TEST(DataText, SingleFileHasExactContentsAndSplit) {
    std::string text;
    for (int i = 0; i < 100; i++) text += (char)('a' + i % 26);  // 100 bytes
    text[7] = (char)0xe9;                                        // a high byte stays one token
    TempFile f(text);
    Config cfg = base_config(f.path, "text");
    cfg.val_fraction =
        0.29;  // 100 * 0.29 is 28.999999999999996 in doubles; the split still holds out 29
    cfg.seq_length = 8;
    Dataset ds;
    char err[MOESIM_ERR_MAX] = {0};
    ASSERT_EQ(dataset_load(&ds, &cfg, err, sizeof err), 0) << err;
    EXPECT_EQ(ds.vocab_size, 256);
    ASSERT_EQ(ds.num_categories, 1);
    EXPECT_EQ(std::string(ds.category_names[0]), fs::path(f.path).filename().string());
    ASSERT_EQ(ds.train.len, 71u);
    ASSERT_EQ(ds.val.len, 29u);
    for (size_t i = 0; i < 71; i++) EXPECT_EQ(ds.train.tokens[i], (unsigned char)text[i]) << i;
    for (size_t i = 0; i < 29; i++) EXPECT_EQ(ds.val.tokens[i], (unsigned char)text[71 + i]) << i;
    EXPECT_EQ(ds.train.tokens[7], 0xe9);
    for (size_t i = 0; i < ds.train.len; i++) EXPECT_EQ(ds.train.categories[i], 0);
    dataset_free(&ds);
}

TEST(DataText, DirectorySkipsIndexFilesSymlinksHiddenAndEmptyFiles) {
    TempDir d;
    d.add("b", std::string(50, 'b'));
    d.add("a", std::string(30, 'a'));
    d.add("a.dat", std::string(40, 'x'));
    d.add(".hidden", std::string(40, 'h'));
    d.add("empty", "");
    ASSERT_EQ(symlink("a", (d.path + "/a.u8").c_str()), 0);
    ASSERT_EQ(mkdir((d.path + "/sub").c_str(), 0700), 0);
    Config cfg = base_config(d.path, "auto");
    cfg.seq_length = 2;
    Dataset ds;
    char err[MOESIM_ERR_MAX] = {0};
    ASSERT_EQ(dataset_load(&ds, &cfg, err, sizeof err), 0) << err;
    ASSERT_EQ(ds.num_categories, 2);
    EXPECT_STREQ(ds.category_names[0], "a");
    EXPECT_STREQ(ds.category_names[1], "b");
    // a: 30 bytes -> 3 to validation; b: 50 bytes -> 5; streams in category order.
    std::string want_train = std::string(27, 'a') + std::string(45, 'b');
    std::string want_val = std::string(3, 'a') + std::string(5, 'b');
    ASSERT_EQ(ds.train.len, want_train.size());
    ASSERT_EQ(ds.val.len, want_val.size());
    for (size_t i = 0; i < ds.train.len; i++) {
        EXPECT_EQ(ds.train.tokens[i], (unsigned char)want_train[i]) << i;
        EXPECT_EQ(ds.train.categories[i], want_train[i] == 'a' ? 0 : 1) << i;
    }
    for (size_t i = 0; i < ds.val.len; i++) {
        EXPECT_EQ(ds.val.tokens[i], (unsigned char)want_val[i]) << i;
        EXPECT_EQ(ds.val.categories[i], want_val[i] == 'a' ? 0 : 1) << i;
    }
    dataset_free(&ds);
}

TEST(DataText, SmallCategoryKeepsOneTokenInEachSplit) {
    TempDir d;
    d.add("big", std::string(1000, 'x'));
    d.add("tiny", "yz");  // 2 * 0.1 rounds down to 0, raised to 1
    Config cfg = base_config(d.path, "text");
    cfg.seq_length = 4;
    Dataset ds;
    char err[MOESIM_ERR_MAX] = {0};
    ASSERT_EQ(dataset_load(&ds, &cfg, err, sizeof err), 0) << err;
    ASSERT_EQ(ds.val.len, 101u);
    EXPECT_EQ(ds.val.tokens[100], 'z');
    EXPECT_EQ(ds.val.categories[100], 1);
    EXPECT_EQ(ds.train.tokens[ds.train.len - 1], 'y');
    EXPECT_EQ(ds.train.categories[ds.train.len - 1], 1);
    dataset_free(&ds);
}

TEST(DataText, DirectoryWithoutUsableFilesNamesPathAndFix) {
    TempDir d;
    d.add("x.dat", "index");
    d.add(".hidden", "text");
    std::string msg = load_error(base_config(d.path, "text"));
    EXPECT_NE(msg.find(d.path), std::string::npos) << msg;
    EXPECT_NE(msg.find("no usable text files"), std::string::npos) << msg;
    EXPECT_NE(msg.find("--data-path"), std::string::npos) << msg;
}

TEST(DataText, UnreadableFileNamesPath) {
    if (geteuid() == 0) GTEST_SKIP() << "root reads every file regardless of mode";
    TempFile f("some text that nobody may read");
    ASSERT_EQ(chmod(f.path.c_str(), 0), 0);
    std::string msg = load_error(base_config(f.path, "text"));
    EXPECT_NE(msg.find(f.path), std::string::npos) << msg;
    EXPECT_NE(msg.find("readable"), std::string::npos) << msg;
}

TEST(DataText, ReadErrorNamesPath) {
    // Root reads everything, but reading /proc/self/mem at offset 0 fails (EIO)
    // for everyone, so this exercises the read-error path in any container.
    std::string msg = load_error(base_config("/proc/self/mem", "text"));
    EXPECT_NE(msg.find("/proc/self/mem"), std::string::npos) << msg;
    EXPECT_NE(msg.find("cannot read"), std::string::npos) << msg;
}

TEST(DataErrors, MissingPathNamesThePath) {
    std::string path = "/tmp/moesim_no_such_data_dir/corpus.txt";
    std::string msg = load_error(base_config(path, "auto"));
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    EXPECT_NE(msg.find("--data-path"), std::string::npos) << msg;

    std::string tok = "/tmp/moesim_no_such_data_dir/corpus.tok";
    msg = load_error(base_config(tok, "auto"));
    EXPECT_NE(msg.find(tok), std::string::npos) << msg;
}

TEST(DataErrors, SeqLengthLargerThanDataNamesTheFlag) {
    TempFile f(std::string(200, 'q'));  // 180 train, 20 validation
    Config cfg = base_config(f.path, "text");
    cfg.seq_length = 20;  // needs 21 tokens in each split
    std::string msg = load_error(cfg);
    EXPECT_NE(msg.find("--seq-length 20 is larger than the data: the validation split of " +
                       f.path + " holds 20 tokens; lower --seq-length or use more data"),
              std::string::npos)
        << msg;
    cfg.seq_length = 19;
    Dataset ds;
    char err[MOESIM_ERR_MAX] = {0};
    EXPECT_EQ(dataset_load(&ds, &cfg, err, sizeof err), 0) << err;
    dataset_free(&ds);

    cfg.val_fraction = 0.95;  // 10 train, 190 validation
    msg = load_error(cfg);
    EXPECT_NE(msg.find("the training split of " + f.path + " holds 10 tokens"), std::string::npos)
        << msg;

    Config syn = base_config("synthetic", "auto");
    syn.synthetic_tokens = 1000;
    syn.seq_length = 4096;
    msg = load_error(syn);
    EXPECT_NE(msg.find("--seq-length 4096 is larger than the data"), std::string::npos) << msg;
}

TEST(DataErrors, UnknownFormatIsRejected) {
    std::string msg = load_error(base_config(kFortunes, "csv"));
    EXPECT_NE(msg.find("--data-format csv"), std::string::npos) << msg;
}

// ------------------------------------------------------------ token files

TEST(DataTokens, RoundTripThroughTokenFile) {
    std::vector<uint16_t> toks(5000);
    for (size_t i = 0; i < toks.size(); i++) toks[i] = (uint16_t)((i * 7919u) % 50000u);
    TempFile f("", ".tok");
    char err[MOESIM_ERR_MAX] = {0};
    ASSERT_EQ(token_file_write(f.path.c_str(), toks.data(), toks.size(), 50000, err, sizeof err), 0)
        << err;
    std::string raw = file_bytes(f.path);
    ASSERT_EQ(raw.size(), 32u + 2 * toks.size());
    EXPECT_EQ(raw.substr(0, 8), "MOESIMTK");
    EXPECT_EQ((unsigned char)raw[32 + 2], toks[1] & 0xff);  // little-endian
    EXPECT_EQ((unsigned char)raw[32 + 3], toks[1] >> 8);

    Config cfg = base_config(f.path, "auto");  // ".tok" selects the token source
    Dataset ds;
    ASSERT_EQ(dataset_load(&ds, &cfg, err, sizeof err), 0) << err;
    EXPECT_EQ(ds.vocab_size, 50000);
    ASSERT_EQ(ds.num_categories, 1);
    EXPECT_EQ(std::string(ds.category_names[0]), fs::path(f.path).filename().string());
    ASSERT_EQ(ds.train.len, 4500u);
    ASSERT_EQ(ds.val.len, 500u);
    std::vector<uint16_t> all = stream_tokens(ds.train);
    std::vector<uint16_t> val = stream_tokens(ds.val);
    all.insert(all.end(), val.begin(), val.end());
    EXPECT_EQ(all, toks);
    dataset_free(&ds);
}

TEST(DataTokens, FullVocabularyOf65536) {
    std::vector<uint16_t> toks(1000);
    for (size_t i = 0; i < toks.size(); i++) toks[i] = (uint16_t)(65535 - i);
    TempFile f("", ".bin");
    char err[MOESIM_ERR_MAX] = {0};
    ASSERT_EQ(token_file_write(f.path.c_str(), toks.data(), toks.size(), 65536, err, sizeof err), 0)
        << err;
    Config cfg = base_config(f.path, "tokens");
    Dataset ds;
    ASSERT_EQ(dataset_load(&ds, &cfg, err, sizeof err), 0) << err;
    EXPECT_EQ(ds.vocab_size, 65536);
    EXPECT_EQ(ds.train.tokens[0], 65535);
    dataset_free(&ds);
}

TEST(DataTokens, PlainTextIsNotATokenFile) {
    TempFile f("This is plain text, not tokens.\nSecond line of text.\n", ".tok");
    std::string msg = load_error(base_config(f.path, "auto"));
    EXPECT_NE(msg.find(f.path), std::string::npos) << msg;
    EXPECT_NE(msg.find("not a moesim token file"), std::string::npos) << msg;
    EXPECT_NE(msg.find("MOESIMTK"), std::string::npos) << msg;
    EXPECT_NE(msg.find("--data-format text"), std::string::npos) << msg;
}

TEST(DataTokens, TruncatedFileReportsExpectedAndActualBytes) {
    std::vector<uint16_t> toks(100, 3);
    TempFile f("", ".tok");
    char err[MOESIM_ERR_MAX] = {0};
    ASSERT_EQ(token_file_write(f.path.c_str(), toks.data(), toks.size(), 16, err, sizeof err), 0)
        << err;
    ASSERT_EQ(truncate(f.path.c_str(), 32 + 200 - 7), 0);
    std::string msg = load_error(base_config(f.path, "tokens"));
    EXPECT_NE(msg.find(f.path), std::string::npos) << msg;
    EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
    EXPECT_NE(msg.find("232 bytes"), std::string::npos) << msg;
    EXPECT_NE(msg.find("225 bytes"), std::string::npos) << msg;

    ASSERT_EQ(truncate(f.path.c_str(), 20), 0);  // inside the header
    msg = load_error(base_config(f.path, "tokens"));
    EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
    EXPECT_NE(msg.find(f.path), std::string::npos) << msg;
}

TEST(DataTokens, TokenOutsideVocabularyNamesItsIndex) {
    std::vector<uint16_t> toks(300, 5);
    TempFile f("", ".tok");
    char err[MOESIM_ERR_MAX] = {0};
    ASSERT_EQ(token_file_write(f.path.c_str(), toks.data(), toks.size(), 10, err, sizeof err), 0)
        << err;
    // Patch token 123 to 10 (== vocab_size) behind the writer's back.
    {
        std::fstream io(f.path, std::ios::in | std::ios::out | std::ios::binary);
        io.seekp(32 + 2 * 123);
        const char bad[2] = {10, 0};
        io.write(bad, 2);
    }
    std::string msg = load_error(base_config(f.path, "tokens"));
    EXPECT_NE(msg.find(f.path), std::string::npos) << msg;
    EXPECT_NE(msg.find("token 10 at index 123"), std::string::npos) << msg;
    EXPECT_NE(msg.find("vocab_size 10"), std::string::npos) << msg;

    // The writer refuses such tokens itself.
    toks[7] = 10;
    EXPECT_EQ(token_file_write(f.path.c_str(), toks.data(), toks.size(), 10, err, sizeof err), -1);
    EXPECT_NE(std::string(err).find("index 7"), std::string::npos) << err;
}

TEST(DataTokens, BadVersionAndVocabAreRejected) {
    std::vector<uint16_t> toks(100, 1);
    TempFile f("", ".tok");
    char err[MOESIM_ERR_MAX] = {0};
    ASSERT_EQ(token_file_write(f.path.c_str(), toks.data(), toks.size(), 4, err, sizeof err), 0)
        << err;
    std::string raw = file_bytes(f.path);
    std::string v2 = raw;
    v2[8] = 2;
    std::ofstream(f.path, std::ios::binary) << v2;
    std::string msg = load_error(base_config(f.path, "tokens"));
    EXPECT_NE(msg.find("version 2"), std::string::npos) << msg;
    std::string vocab0 = raw;
    vocab0[12] = 0;
    std::ofstream(f.path, std::ios::binary) << vocab0;
    msg = load_error(base_config(f.path, "tokens"));
    EXPECT_NE(msg.find("vocab_size 0"), std::string::npos) << msg;
}

TEST(DataTokens, WriteToMissingDirectoryFails) {
    uint16_t t[2] = {1, 2};
    char err[MOESIM_ERR_MAX] = {0};
    const char *path = "/tmp/moesim_no_such_dir/x.tok";
    EXPECT_EQ(token_file_write(path, t, 2, 4, err, sizeof err), -1);
    EXPECT_NE(std::string(err).find(path), std::string::npos) << err;
}

// -------------------------------------------------------------- synthetic

TEST(DataSynthetic, SameSeedSameStreamDifferentSeedDifferent) {
    Config cfg = base_config("synthetic", "auto");
    Dataset a, b, c;
    char err[MOESIM_ERR_MAX] = {0};
    ASSERT_EQ(dataset_load(&a, &cfg, err, sizeof err), 0) << err;
    ASSERT_EQ(dataset_load(&b, &cfg, err, sizeof err), 0) << err;
    cfg.seed = 1235;
    ASSERT_EQ(dataset_load(&c, &cfg, err, sizeof err), 0) << err;

    EXPECT_EQ(a.vocab_size, 256);
    ASSERT_EQ(a.num_categories, 4);
    for (int k = 0; k < 4; k++)
        EXPECT_EQ(std::string(a.category_names[k]), "cluster" + std::to_string(k));
    EXPECT_EQ(a.train.len + a.val.len, (size_t)cfg.synthetic_tokens);
    EXPECT_EQ(stream_tokens(a.train), stream_tokens(b.train));
    EXPECT_EQ(stream_tokens(a.val), stream_tokens(b.val));
    EXPECT_EQ(stream_categories(a.train), stream_categories(b.train));
    EXPECT_NE(stream_tokens(a.train), stream_tokens(c.train));

    std::set<int> train_cats, val_cats;
    for (size_t i = 0; i < a.train.len; i++) {
        ASSERT_GE(a.train.categories[i], 0);
        ASSERT_LT(a.train.categories[i], 4);
        ASSERT_LT(a.train.tokens[i], 256);
        train_cats.insert(a.train.categories[i]);
    }
    for (size_t i = 0; i < a.val.len; i++) {
        ASSERT_GE(a.val.categories[i], 0);
        ASSERT_LT(a.val.categories[i], 4);
        val_cats.insert(a.val.categories[i]);
    }
    EXPECT_EQ(train_cats.size(), 4u);
    EXPECT_EQ(val_cats.size(), 4u);
    // Whole documents of 256 tokens: a category never changes inside one.
    for (size_t i = 0; i + 1 < a.train.len; i++) {
        if ((i + 1) % 256 != 0) {
            ASSERT_EQ(a.train.categories[i], a.train.categories[i + 1]) << i;
        }
    }
    dataset_free(&a);
    dataset_free(&b);
    dataset_free(&c);
}

TEST(DataSynthetic, ClustersHaveDifferentSparseChains) {
    Config cfg = base_config("synthetic", "synthetic");
    cfg.synthetic_clusters = 3;
    cfg.synthetic_tokens = 256 * 1200;
    Dataset ds;
    char err[MOESIM_ERR_MAX] = {0};
    ASSERT_EQ(dataset_load(&ds, &cfg, err, sizeof err), 0) << err;
    // Bigram counts per cluster, within documents only.
    std::vector<std::map<int, double>> bigrams(3);
    std::vector<double> totals(3);
    std::vector<std::vector<std::set<int>>> successors(3, std::vector<std::set<int>>(256));
    for (size_t i = 0; i + 1 < ds.train.len; i++) {
        if ((i + 1) % 256 == 0) continue;
        int k = ds.train.categories[i];
        int x = ds.train.tokens[i], y = ds.train.tokens[i + 1];
        bigrams[k][x * 256 + y] += 1;
        totals[k] += 1;
        successors[k][x].insert(y);
    }
    for (int k = 0; k < 3; k++) {
        ASSERT_GT(totals[k], 10000) << "cluster " << k << " has too few documents";
        size_t visited = 0;
        for (int x = 0; x < 256; x++) {
            EXPECT_LE(successors[k][x].size(), 4u) << "cluster " << k << " state " << x;
            visited += !successors[k][x].empty();
        }
        EXPECT_GT(visited, 32u) << "cluster " << k << " chain is stuck in a few states";
    }
    // Total variation distance between the clusters' bigram distributions.
    for (int p = 0; p < 3; p++) {
        for (int q = p + 1; q < 3; q++) {
            std::set<int> keys;
            for (auto &kv : bigrams[p]) keys.insert(kv.first);
            for (auto &kv : bigrams[q]) keys.insert(kv.first);
            double tv = 0;
            for (int key : keys) {
                double a = bigrams[p].count(key) ? bigrams[p][key] / totals[p] : 0;
                double b = bigrams[q].count(key) ? bigrams[q][key] / totals[q] : 0;
                tv += std::fabs(a - b);
            }
            tv *= 0.5;
            EXPECT_GT(tv, 0.8) << "clusters " << p << " and " << q << " look alike";
        }
    }
    dataset_free(&ds);
}

TEST(DataSynthetic, BadParametersNameTheFlag) {
    Config cfg = base_config("synthetic", "synthetic");
    cfg.synthetic_clusters = 0;
    EXPECT_NE(load_error(cfg).find("--synthetic-clusters 0"), std::string::npos);
    cfg = base_config("synthetic", "synthetic");
    cfg.synthetic_tokens = 0;
    EXPECT_NE(load_error(cfg).find("--synthetic-tokens 0"), std::string::npos);
}

// ---------------------------------------------------------------- batches

namespace {

struct Batch {
    std::vector<int> inputs, targets, categories;
    Batch(int B, int T)
        : inputs((size_t)B * T), targets((size_t)B * T), categories((size_t)B * T) {}
    bool operator==(const Batch &o) const {
        return inputs == o.inputs && targets == o.targets && categories == o.categories;
    }
};

Batch train_batch(const Dataset &ds, long seed, long step, int rank, int B, int T) {
    Batch b(B, T);
    dataset_train_batch(&ds, seed, step, rank, B, T, b.inputs.data(), b.targets.data(),
                        b.categories.data());
    return b;
}

Batch val_batch(const Dataset &ds, long seed, long i, int rank, int B, int T) {
    Batch b(B, T);
    dataset_val_batch(&ds, seed, i, rank, B, T, b.inputs.data(), b.targets.data(),
                      b.categories.data());
    return b;
}

// A hand-made dataset whose token at stream position i is i, so a batch
// shows exactly which positions it read. Categories change every 100 tokens.
void position_dataset(Dataset *ds, size_t len) {
    memset(ds, 0, sizeof *ds);
    ds->vocab_size = 65536;
    for (TokenStream *s : {&ds->train, &ds->val}) {
        s->tokens = (uint16_t *)malloc(len * sizeof(uint16_t));
        s->categories = (int32_t *)malloc(len * sizeof(int32_t));
        s->len = len;
        for (size_t i = 0; i < len; i++) {
            s->tokens[i] = (uint16_t)i;
            s->categories[i] = (int32_t)(i / 100);
        }
    }
}

}  // namespace

TEST(DataBatch, RanksTogetherSeeTheOneRankBatch) {
    Config cfg = base_config(kFortunes, "text");
    Dataset ds;
    char err[MOESIM_ERR_MAX] = {0};
    ASSERT_EQ(dataset_load(&ds, &cfg, err, sizeof err), 0) << err;
    const int B = 3, T = 32;
    for (int P : {2, 4}) {
        for (long step : {0L, 1L, 17L}) {
            Batch whole = train_batch(ds, 42, step, 0, P * B, T);
            Batch vwhole = val_batch(ds, 42, step, 0, P * B, T);
            Batch joined(0, 0), vjoined(0, 0);
            for (int r = 0; r < P; r++) {
                Batch part = train_batch(ds, 42, step, r, B, T);
                Batch vpart = val_batch(ds, 42, step, r, B, T);
                joined.inputs.insert(joined.inputs.end(), part.inputs.begin(), part.inputs.end());
                joined.targets.insert(joined.targets.end(), part.targets.begin(),
                                      part.targets.end());
                joined.categories.insert(joined.categories.end(), part.categories.begin(),
                                         part.categories.end());
                vjoined.inputs.insert(vjoined.inputs.end(), vpart.inputs.begin(),
                                      vpart.inputs.end());
                vjoined.targets.insert(vjoined.targets.end(), vpart.targets.begin(),
                                       vpart.targets.end());
                vjoined.categories.insert(vjoined.categories.end(), vpart.categories.begin(),
                                          vpart.categories.end());
            }
            EXPECT_EQ(joined.inputs, whole.inputs) << "P=" << P << " step=" << step;
            EXPECT_EQ(joined.targets, whole.targets) << "P=" << P << " step=" << step;
            EXPECT_EQ(joined.categories, whole.categories) << "P=" << P << " step=" << step;
            EXPECT_TRUE(vjoined == vwhole) << "P=" << P << " eval batch=" << step;
        }
    }
    dataset_free(&ds);
}

TEST(DataBatch, TargetsAreTheNextTokenAndCategoriesFollowInputs) {
    Dataset ds;
    const size_t len = 5000;
    position_dataset(&ds, len);
    const int B = 8, T = 64;
    for (long step = 0; step < 20; step++) {
        Batch b = train_batch(ds, 7, step, 1, B, T);
        for (int s = 0; s < B; s++) {
            int start = b.inputs[(size_t)s * T];
            ASSERT_GE(start, 0);
            ASSERT_LE((size_t)start + T, len - 1) << "the last target must lie inside the stream";
            for (int t = 0; t < T; t++) {
                size_t i = (size_t)s * T + t;
                ASSERT_EQ(b.inputs[i], start + t);
                ASSERT_EQ(b.targets[i], start + t + 1);
                ASSERT_EQ(b.categories[i], (start + t) / 100);
            }
        }
    }
    dataset_free(&ds);
}

TEST(DataBatch, StartsCoverTheWholeStream) {
    Dataset ds;
    const size_t len = 1000;
    const int T = 10;
    position_dataset(&ds, len);
    std::set<int> starts;
    for (long step = 0; step < 400; step++) {
        Batch b = train_batch(ds, 3, step, 0, 16, T);
        for (int s = 0; s < 16; s++) starts.insert(b.inputs[(size_t)s * T]);
    }
    // 6400 draws over 990 positions: every start, including the last one, appears.
    EXPECT_EQ(starts.size(), len - T);
    EXPECT_EQ(*starts.begin(), 0);
    EXPECT_EQ(*starts.rbegin(), (int)(len - T - 1));
    dataset_free(&ds);
}

TEST(DataBatch, ValidationIsRepeatableAndIndependentOfTraining) {
    Dataset ds;
    position_dataset(&ds, 20000);  // identical train and validation streams
    const int B = 4, T = 16;
    Batch v0 = val_batch(ds, 5, 0, 0, B, T);
    EXPECT_TRUE(v0 == val_batch(ds, 5, 0, 0, B, T));
    EXPECT_FALSE(v0 == val_batch(ds, 5, 1, 0, B, T));
    EXPECT_FALSE(v0 == train_batch(ds, 5, 0, 0, B, T)) << "validation must use its own hash domain";
    Batch t0 = train_batch(ds, 5, 0, 0, B, T);
    EXPECT_TRUE(t0 == train_batch(ds, 5, 0, 0, B, T));
    EXPECT_FALSE(t0 == train_batch(ds, 5, 1, 0, B, T)) << "different steps must differ";
    EXPECT_FALSE(t0 == train_batch(ds, 6, 0, 0, B, T)) << "different seeds must differ";
    EXPECT_FALSE(t0 == train_batch(ds, 5, 0, 1, B, T)) << "different ranks must differ";
    dataset_free(&ds);
}

TEST(DataFree, SafeOnZeroedAndRepeated) {
    Dataset ds;
    memset(&ds, 0, sizeof ds);
    dataset_free(&ds);
    dataset_free(&ds);
    Config cfg = base_config("synthetic", "synthetic");
    char err[MOESIM_ERR_MAX] = {0};
    ASSERT_EQ(dataset_load(&ds, &cfg, err, sizeof err), 0) << err;
    dataset_free(&ds);
    EXPECT_EQ(ds.train.tokens, nullptr);
    EXPECT_EQ(ds.num_categories, 0);
    dataset_free(&ds);
}
