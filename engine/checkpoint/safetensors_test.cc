#include "engine/checkpoint/safetensors.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/common/dtype.h"

namespace kl {
namespace {

std::string TestDir() {
  const std::string dir = absl::StrCat(testing::TempDir(),
                                       testing::UnitTest::GetInstance()->current_test_info()->name());
  ::mkdir(dir.c_str(), 0755);
  return dir;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

bool FileExistsForTest(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

void WriteAll(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A raw file: u64 LE header length, header text, then `data_bytes` zero bytes.
std::string RawFile(const std::string& header, size_t data_bytes, uint64_t header_len_override = 0) {
  const uint64_t n = header_len_override != 0 ? header_len_override : header.size();
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(n >> (8 * i));
  return out + header + std::string(data_bytes, '\0');
}

// Expects Open(path) to fail with `code` and a message naming the path and containing `want`.
void ExpectOpenError(const std::string& path, absl::StatusCode code, const std::string& want) {
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(path);
  ASSERT_FALSE(f.ok()) << want;
  EXPECT_EQ(f.status().code(), code) << f.status();
  const std::string msg(f.status().message());
  EXPECT_EQ(msg.rfind(path, 0), 0u) << msg;
  EXPECT_NE(msg.find(want), std::string::npos) << "got: " << msg << "\nwant: " << want;
}

TEST(Safetensors, RoundTripAllDtypesAndAlignment) {
  const std::string path = TestDir() + "/a.safetensors";
  const std::vector<float> f32 = {1.5f, -2.0f, 3.25f};
  const std::vector<uint16_t> bf16 = {F32ToBf16(1.0f), F32ToBf16(-0.5f), F32ToBf16(8.0f)};
  const std::vector<int64_t> i64 = {-1, 1LL << 40};
  const std::vector<double> f64 = {0.1};
  std::vector<TensorToWrite> tensors(5);
  tensors[0] = {"w.bf16", DType::kBF16, {3}, bf16.data(), nullptr};
  tensors[1] = {"w.f32", DType::kF32, {1, 3}, f32.data(), nullptr};
  tensors[2] = {"w.i64", DType::kI64, {2}, i64.data(), nullptr};
  tensors[3] = {"w.f64.scalar", DType::kF64, {}, f64.data(), nullptr};
  tensors[4] = {"w.empty", DType::kF16, {0, 4}, nullptr, [](void*) { FAIL() << "no bytes to fill"; }};
  ASSERT_TRUE(WriteSafetensors(path, tensors, {{"format", "pt"}}).ok());

  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->metadata().at("format"), "pt");
  EXPECT_EQ((*f)->TensorNames(),
            (std::vector<std::string>{"w.bf16", "w.empty", "w.f32", "w.f64.scalar", "w.i64"}));
  absl::StatusOr<TensorView> v = (*f)->Get("w.f32");
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->dtype, DType::kF32);
  EXPECT_EQ(v->shape, (std::vector<int64_t>{1, 3}));
  EXPECT_EQ(v->bytes, 12u);
  EXPECT_EQ(v->file, path);
  EXPECT_EQ(std::memcmp(v->data, f32.data(), 12), 0);
  v = (*f)->Get("w.f64.scalar");
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->NumElements(), 1);
  EXPECT_EQ(std::memcmp(v->data, f64.data(), 8), 0);
  v = (*f)->Get("w.i64");
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(std::memcmp(v->data, i64.data(), 16), 0);
  v = (*f)->Get("w.empty");
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->bytes, 0u);
  EXPECT_EQ((*f)->Get("nope").status().code(), absl::StatusCode::kNotFound);

  // HF layout: data section 8-byte aligned; every tensor aligned to its element size.
  const std::string bytes = ReadAll(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  EXPECT_EQ((8 + n) % 8, 0u);
  for (const std::string& name : (*f)->TensorNames()) {
    TensorView t = *(*f)->Get(name);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data) % DTypeSize(t.dtype), 0u) << name;
  }
}

TEST(Safetensors, WriterIsDeterministicAndFillWorks) {
  const std::string dir = TestDir();
  auto write = [&](const std::string& path) {
    std::vector<TensorToWrite> t(2);
    t[0] = {"b", DType::kF32, {2, 2}, nullptr, [](void* dst) {
              float* p = static_cast<float*>(dst);
              for (int i = 0; i < 4; ++i) p[i] = static_cast<float>(i);
            }};
    static const uint16_t kHalf[2] = {0x3c00, 0x4000};
    t[1] = {"a", DType::kF16, {2}, kHalf, nullptr};
    return WriteSafetensors(path, t, {{"format", "pt"}});
  };
  ASSERT_TRUE(write(dir + "/1.safetensors").ok());
  ASSERT_TRUE(write(dir + "/2.safetensors").ok());
  EXPECT_EQ(ReadAll(dir + "/1.safetensors"), ReadAll(dir + "/2.safetensors"));
  auto f = SafetensorsFile::Open(dir + "/1.safetensors");
  ASSERT_TRUE(f.ok()) << f.status();
  TensorView b = *(*f)->Get("b");
  EXPECT_EQ(static_cast<const float*>(b.data)[3], 3.0f);
  EXPECT_FALSE(FileExistsForTest(dir + "/1.safetensors.tmp"));
}

TEST(Safetensors, WriterRejectsBadInput) {
  const std::string path = TestDir() + "/x.safetensors";
  const float one = 1.0f;
  std::vector<TensorToWrite> dup = {{"a", DType::kF32, {1}, &one, nullptr},
                                    {"a", DType::kF32, {1}, &one, nullptr}};
  EXPECT_EQ(WriteSafetensors(path, dup).code(), absl::StatusCode::kInvalidArgument);
  std::vector<TensorToWrite> none = {{"a", DType::kF32, {1}, nullptr, nullptr}};
  EXPECT_EQ(WriteSafetensors(path, none).code(), absl::StatusCode::kInvalidArgument);
  std::vector<TensorToWrite> meta = {{"__metadata__", DType::kF32, {1}, &one, nullptr}};
  EXPECT_EQ(WriteSafetensors(path, meta).code(), absl::StatusCode::kInvalidArgument);
}

TEST(Safetensors, RejectsMalformedFiles) {
  const std::string dir = TestDir();
  struct Case {
    const char* name;
    std::string bytes;
    absl::StatusCode code;
    std::string want;
  };
  const std::string good_entry = R"("t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})";
  const std::vector<Case> cases = {
      {"short", std::string("\x01\x02\x03", 3), absl::StatusCode::kDataLoss,
       "too short for the 8-byte header length"},
      {"header_past_eof", RawFile("{}", 0, 1000), absl::StatusCode::kDataLoss,
       "header length 1000 runs past the end of the file"},
      {"header_huge", RawFile("{}", 0, 1ull << 40), absl::StatusCode::kInvalidArgument,
       "exceeds the 100 MiB limit"},
      {"bad_json", RawFile(R"({"t": {"dtype": "F32",)", 8), absl::StatusCode::kInvalidArgument,
       "malformed header JSON"},
      // Found by //tests/fuzz:safetensors_fuzzer: nlohmann throws out_of_range
      // (not parse_error) for a number beyond double, which escaped Open.
      {"number_overflow", RawFile(R"({"t": 1e99999})", 0), absl::StatusCode::kInvalidArgument,
       "malformed header JSON"},
      {"not_object", RawFile("[1, 2]", 0), absl::StatusCode::kInvalidArgument,
       "header JSON is not an object"},
      {"unknown_dtype",
       RawFile(R"({"t": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}})", 2),
       absl::StatusCode::kInvalidArgument, "tensor t: unknown dtype \"F8_E4M3\""},
      {"size_mismatch", RawFile(R"({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", 8),
       absl::StatusCode::kInvalidArgument,
       "tensor t: data_offsets [0, 8] hold 8 bytes but shape [3] of F32 needs 12"},
      {"begin_after_end",
       RawFile(R"({"t": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}})", 8),
       absl::StatusCode::kInvalidArgument, "has begin > end"},
      {"negative_dim", RawFile(R"({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})", 8),
       absl::StatusCode::kInvalidArgument, "tensor t: invalid shape [-2]"},
      {"no_offsets", RawFile(R"({"t": {"dtype": "F32", "shape": [2]}})", 8),
       absl::StatusCode::kInvalidArgument, "data_offsets must be [begin, end]"},
      {"out_of_range", RawFile("{" + good_entry + "}", 4), absl::StatusCode::kDataLoss,
       "tensor t: data_offsets end 8 is past the end of the data section (4 bytes)"},
      {"overlap",
       RawFile("{" + good_entry +
                   R"(, "u": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
               12),
       absl::StatusCode::kInvalidArgument, "tensors t [0, 8) and u [4, 12) overlap"},
      {"bad_metadata", RawFile(R"({"__metadata__": {"format": 1}})", 0),
       absl::StatusCode::kInvalidArgument, "__metadata__.format is not a string"},
  };
  for (const Case& c : cases) {
    const std::string path = dir + "/" + c.name + ".safetensors";
    WriteAll(path, c.bytes);
    SCOPED_TRACE(c.name);
    ExpectOpenError(path, c.code, c.want);
  }
  ExpectOpenError(dir + "/missing.safetensors", absl::StatusCode::kNotFound, "no such file");
}

TEST(Safetensors, DetectsTruncation) {
  const std::string path = TestDir() + "/t.safetensors";
  std::vector<float> big(1000, 0.5f);
  std::vector<TensorToWrite> t = {{"first", DType::kF32, {1000}, big.data(), nullptr},
                                  {"second", DType::kF32, {1000}, big.data(), nullptr}};
  ASSERT_TRUE(WriteSafetensors(path, t).ok());
  ASSERT_TRUE(SafetensorsFile::Open(path).ok());
  const std::string bytes = ReadAll(path);
  WriteAll(path, bytes.substr(0, bytes.size() - 1));
  ExpectOpenError(path, absl::StatusCode::kDataLoss,
                  "tensor second: data_offsets end 8000 is past the end of the data section (7999 bytes)");
}

}  // namespace
}  // namespace kl
