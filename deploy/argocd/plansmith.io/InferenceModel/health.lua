-- Argo CD health of a plansmith.io/InferenceModel, from the status the plansmith operator writes.
--   Healthy:     Ready=True and status.observedGeneration == metadata.generation
--   Degraded:    Valid=False, phase Failed, or a target (GPU type) in state Failed
--   Progressing: everything else, including no status yet and a status older than the spec
local hs = {}

local function find_condition(conditions, wanted)
  if conditions == nil then
    return nil
  end
  for _, condition in ipairs(conditions) do
    if condition.type == wanted then
      return condition
    end
  end
  return nil
end

local function describe(condition, fallback)
  if condition == nil then
    return fallback
  end
  local text = condition.reason or fallback
  if condition.message ~= nil and condition.message ~= "" then
    text = text .. ": " .. condition.message
  end
  return text
end

local function target_name(target)
  return target.gpuProduct or target.computeCapability or "unknown GPU type"
end

local status = obj.status
local generation = obj.metadata and obj.metadata.generation
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the plansmith operator to report status"
  return hs
end
if generation ~= nil and status.observedGeneration ~= generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile generation " .. tostring(generation)
  return hs
end

local valid = find_condition(status.conditions, "Valid")
if valid ~= nil and valid.status == "False" then
  hs.status = "Degraded"
  hs.message = "Invalid spec: " .. describe(valid, "Invalid")
  return hs
end

if status.targets ~= nil then
  for _, target in ipairs(status.targets) do
    if target.state == "Failed" then
      hs.status = "Degraded"
      hs.message = "Build for " .. target_name(target) .. " failed: " .. describe(target, "Failed")
      return hs
    end
  end
end

local ready = find_condition(status.conditions, "Ready")
if status.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = describe(ready, "Failed")
  return hs
end

if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  local engines = ""
  if status.enginesReady ~= nil and status.targetCount ~= nil then
    engines = tostring(status.enginesReady) .. "/" .. tostring(status.targetCount) .. " engines ready"
  end
  if status.serving ~= nil and status.serving.endpoint ~= nil then
    engines = engines .. (engines ~= "" and ", " or "") .. "serving at " .. status.serving.endpoint
  end
  hs.message = engines ~= "" and engines or describe(ready, "Ready")
  return hs
end

hs.status = "Progressing"
hs.message = (status.phase or "Pending") .. ": " .. describe(ready, "not ready yet")
return hs
