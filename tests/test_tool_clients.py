"""A real third-party client against a 3-stage group: LangChain's ChatOpenAI runs a small agent
(bind_tools: the model calls a tool, the agent runs it and hands back the result, the model
answers) and with_structured_output returns a validated Pydantic object."""

import json
from typing import Literal

import pytest
from harness import Cluster, run
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field
from tiny_models import make_tiny_checkpoint

KEY = "sk-test-langchain"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = {"max_position_embeddings": 2048}
    return make_tiny_checkpoint("qwen2", tmp_path_factory.mktemp("lc") / "qwen2", seed=5, config=cfg)


@tool
def get_weather(city: Literal["Paris", "Oslo", "Lima"], days: int) -> str:
    """The weather forecast of a city for a number of days."""
    return json.dumps({"city": city, "days": days, "forecast": "sunny"})


class Answer(BaseModel):
    city: Literal["Paris", "Oslo", "Lima"]
    warm: bool
    note: str = Field(max_length=12)


def test_langchain_agent_with_tools_and_structured_output(ckpt):
    async def main():
        async with Cluster(ckpt, workers=3, api_key=KEY) as c:
            llm = ChatOpenAI(
                model=c.master.model_id,
                base_url=c.base_url + "/v1",
                api_key=KEY,
                temperature=0,
                max_tokens=300,
                max_retries=0,
            )
            tools = {"get_weather": get_weather}
            messages: list = [SystemMessage("You help with the weather."), HumanMessage("Weather in Oslo?")]
            ran = []
            # the agent: the first step must call the tool, later steps may answer
            for step in range(3):
                bound = llm.bind_tools([get_weather], tool_choice="get_weather" if step == 0 else "auto")
                reply = await bound.ainvoke(messages)
                assert isinstance(reply, AIMessage)
                messages.append(reply)
                if not reply.tool_calls:
                    break
                for call in reply.tool_calls:
                    result = await tools[call["name"]].ainvoke(call["args"])
                    ran.append(call["args"])
                    messages.append(ToolMessage(result, tool_call_id=call["id"]))
            assert ran and ran[0]["city"] in ("Paris", "Oslo", "Lima") and isinstance(ran[0]["days"], int)
            assert isinstance(messages[-1], (AIMessage, ToolMessage))
            # streamed, the same first call
            bound = llm.bind_tools([get_weather], tool_choice="get_weather")
            chunks = [ch async for ch in bound.astream(messages[:2])]
            merged = chunks[0]
            for ch in chunks[1:]:
                merged = merged + ch
            assert merged.tool_calls and merged.tool_calls[0]["args"] == ran[0]
            # structured output
            structured = llm.with_structured_output(Answer)
            out = await structured.ainvoke([HumanMessage("Is it warm in Lima?")])
            assert isinstance(out, Answer)
            assert c.engine.held() == {"running": 0, "waiting": 0, "text_streams": 0}

    run(main())
