// A StateBundle written by one process and read by another reproduces the
// single-process logits exactly (bitwise), and a bundle that does not match is
// refused with the right status, never decoded.
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "engine/config/model_config.h"
#include "tools/make_checkpoint/maker.h"

namespace kl {
namespace {

std::string Tmp() { return std::getenv("TEST_TMPDIR"); }
std::string Tool() {
  return std::string(std::getenv("TEST_SRCDIR")) + "/kimi_serve/tests/handoff/handoff_tool";
}

std::string Slurp(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Runs the tool; returns its exit code, stderr captured in *err.
int RunTool(const std::string& args, std::string* err = nullptr) {
  const std::string errfile = Tmp() + "/stderr.txt";
  const int rc = std::system((Tool() + " " + args + " 2>" + errfile).c_str());
  if (err) *err = Slurp(errfile);
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

class HandoffTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    MakerOptions o;
    o.seed = 1;
    ASSERT_TRUE(MakeCheckpoint(TinyConfig(), Tmp() + "/model_a", o).ok());
    o.seed = 2;
    ASSERT_TRUE(MakeCheckpoint(TinyConfig(), Tmp() + "/model_b", o).ok());
  }
};

constexpr char kPrompt[] =
    "--tokens=11,400,3,77,1024,9,512,600,81,5,6,7,3000,12,13,14,15,16,17,18,19,20,21,22,23,24,25,"
    "26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47,48,49,50,51,52,53,54,55,"
    "56,57,58,59,60,61,62,63,64,65,66,67,68,69,70";

TEST_F(HandoffTest, CrossProcessBundleReproducesSingleProcessLogitsExactly) {
  const std::string a = " --model=" + Tmp() + "/model_a ";
  ASSERT_EQ(RunTool("single" + a + kPrompt + " --steps=12 --logits=" + Tmp() + "/single.bin"), 0);
  ASSERT_EQ(RunTool("prefill" + a + kPrompt + " --out=" + Tmp() + "/b.bundle"), 0);
  std::string err;
  ASSERT_EQ(RunTool("decode" + a + "--bundle=" + Tmp() + "/b.bundle --steps=12 --logits=" + Tmp() +
                        "/split.bin",
                    &err),
            0)
      << err;
  const std::string single = Slurp(Tmp() + "/single.bin"), split = Slurp(Tmp() + "/split.bin");
  ASSERT_EQ(single.size(), 12u * TinyConfig().vocab_size * 4);
  EXPECT_TRUE(single == split) << "logits differ after the hand-off";
}

TEST_F(HandoffTest, CorruptedBundleIsRefused) {
  const std::string a = " --model=" + Tmp() + "/model_a ";
  ASSERT_EQ(RunTool("prefill" + a + kPrompt + " --out=" + Tmp() + "/c.bundle"), 0);
  std::string blob = Slurp(Tmp() + "/c.bundle");
  ASSERT_GT(blob.size(), 1000u);
  blob[blob.size() / 2] ^= 0x10;  // inside a payload
  std::ofstream(Tmp() + "/bad.bundle", std::ios::binary) << blob;
  std::string err;
  EXPECT_EQ(RunTool("decode" + a + "--bundle=" + Tmp() + "/bad.bundle --logits=" + Tmp() + "/x.bin",
                    &err),
            1);
  EXPECT_NE(err.find("DATA_LOSS"), std::string::npos) << err;
  // Truncated: the final record is missing.
  std::ofstream(Tmp() + "/short.bundle", std::ios::binary)
      << Slurp(Tmp() + "/c.bundle").substr(0, blob.size() - 7);
  EXPECT_EQ(RunTool("decode" + a + "--bundle=" + Tmp() + "/short.bundle --logits=" + Tmp() + "/x.bin",
                    &err),
            1);
}

TEST_F(HandoffTest, BundleFromOtherWeightsIsRefused) {
  ASSERT_EQ(RunTool(std::string("prefill --model=") + Tmp() + "/model_b " + kPrompt + " --out=" +
                    Tmp() + "/other.bundle"),
            0);
  std::string err;
  EXPECT_EQ(RunTool(std::string("decode --model=") + Tmp() + "/model_a --bundle=" + Tmp() +
                        "/other.bundle --logits=" + Tmp() + "/x.bin",
                    &err),
            1);
  EXPECT_NE(err.find("FAILED_PRECONDITION"), std::string::npos) << err;
  EXPECT_NE(err.find("checkpoint"), std::string::npos) << err;
}

}  // namespace
}  // namespace kl
