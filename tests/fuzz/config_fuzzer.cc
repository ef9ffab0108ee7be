// Fuzz target: config.json parsing (engine/config). Any bytes go to
// ParseModelConfig; an accepted config must validate, be usable by the
// functions that take a valid config, and survive a ModelConfigToJson round
// trip unchanged.
#include <cstddef>
#include <cstdint>
#include <string>

#include "engine/config/model_config.h"
#include "tests/fuzz/fuzz_interface.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<kl::ModelConfig> config = kl::ParseModelConfig(text);
  if (!config.ok()) {
    KL_FUZZ_CHECK(absl::IsInvalidArgument(config.status()),
                  std::string(config.status().ToString()).c_str());
    return 0;
  }
  KL_FUZZ_CHECK(config->Validate().ok(), "parsed config does not validate");
  (void)kl::ParameterCount(*config);
  (void)kl::StateFingerprint(*config);
  (void)config->NumKdaLayers();
  (void)config->NumMlaLayers();
  const std::string json = kl::ModelConfigToJson(*config);
  absl::StatusOr<kl::ModelConfig> again = kl::ParseModelConfig(json);
  KL_FUZZ_CHECK(again.ok(), std::string(again.status().ToString()).c_str());
  KL_FUZZ_CHECK(kl::ModelConfigToJson(*again) == json, "ModelConfigToJson round trip differs");
  KL_FUZZ_CHECK(kl::StateFingerprint(*again) == kl::StateFingerprint(*config),
                "state fingerprint changed in the round trip");
  return 0;
}
